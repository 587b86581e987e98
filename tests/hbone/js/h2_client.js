#!/usr/bin/env node
// HTTP/2 CONNECT client over mutual TLS 1.3 with Node's built-in http2: the independent
// HBONE client that talks to ztun's HBONE server in the interop tests.
//
//   node h2_client.js --to HOST:PORT --cert C --key K --ca CA [--expect-server spiffe://...]
//        [--forward 127.0.0.1:0 --target IP:PORT]
//
// Verifies the server's chain against CA and its URI SAN against --expect-server (no SNI,
// as HBONE). Driven by JSON-lines commands on stdin:
//   {"op":"session","s":0}                          open a connection; reports its SETTINGS
//   {"op":"open","s":0,"n":1,"authority":"ip:port"}  a CONNECT stream (events: response,
//                                                    data, end, close with rstCode/SHA-256)
//   {"op":"write","n":1,"b64":"..."} / {"op":"end","n":1} / {"op":"rst","n":1,"code":8}
//   {"op":"echo_many","s":0,"authority":..,"sizes":[..],"chunk":N}  concurrent streams
//        sending random data (random chunking), reporting sent/received SHA-256 per stream
// With --forward it also listens on a TCP port and carries each accepted connection as a
// CONNECT stream to --target over one pooled session (FIN <-> END_STREAM, RST <-> RST_STREAM).
'use strict';
const crypto = require('crypto');
const http2 = require('http2');
const net = require('net');
const tls = require('tls');
const { parseArgs, emit, hostPort, tlsMaterial, uriSans, track, commands } = require('./common');

const args = parseArgs(process.argv.slice(2));
const [toHost, toPort] = hostPort(args.to);
const material = tlsMaterial(args);
const settings = args.settings ? JSON.parse(args.settings) : {};
const { NGHTTP2_CANCEL } = http2.constants;
const sessions = {};
const streams = {};

function openSession(s) {
  const session = http2.connect(`https://${toHost.includes(':') ? `[${toHost}]` : toHost}:${toPort}`, {
    settings,
    createConnection: () => {
      const sock = tls.connect({
        ...material,
        host: toHost,
        port: toPort,
        servername: '', // HBONE sends no SNI
        ALPNProtocols: ['h2'],
        checkServerIdentity: (_host, cert) => {
          const sans = uriSans(cert);
          if (args['expect-server'] && !sans.includes(args['expect-server']))
            return new Error(`server presented ${sans.join(',')}, expected ${args['expect-server']}`);
          return undefined;
        },
      });
      sock.setNoDelay(true);
      return sock;
    },
  });
  sessions[s] = session;
  session.on('connect', (sess, sock) => {
    emit({
      ev: 'session',
      s,
      alpn: sock.alpnProtocol,
      tls: sock.getProtocol(),
      cipher: sock.getCipher().name,
      peerSans: uriSans(sock.getPeerCertificate()),
    });
  });
  session.on('remoteSettings', (st) => emit({ ev: 'remote_settings', s, settings: st, state: session.state }));
  session.on('goaway', (code, last) => emit({ ev: 'goaway', s, code, lastStreamID: last }));
  session.on('error', (e) => emit({ ev: 'session_error', s, error: String(e && e.code || e), message: String(e && e.message) }));
  session.on('frameError', (type, code, id) => emit({ ev: 'frame_error', s, type, code, id }));
  session.on('close', () => emit({ ev: 'session_close', s }));
  return session;
}

function open(s, n, authority, extra, keepData) {
  const session = sessions[s];
  const req = session.request({ ':method': 'CONNECT', ':authority': authority, ...(extra || {}) }, { endStream: false });
  const info = { n };
  streams[n] = req;
  track(req, info, { keepData });
  req.on('response', (headers, flags) => {
    emit({ ev: 'response', n, status: headers[':status'], headers, endStream: !!(flags & 1), state: session.state });
  });
  return { req, info };
}

function randomChunks(total, maxChunk) {
  const out = [];
  let left = total;
  while (left > 0) {
    const k = Math.min(left, 1 + crypto.randomInt(maxChunk));
    out.push(crypto.randomBytes(k));
    left -= k;
  }
  return out;
}

function echoMany(cmd) {
  const session = sessions[cmd.s];
  let pending = cmd.sizes.length;
  const results = [];
  cmd.sizes.forEach((size, i) => {
    const req = session.request({ ':method': 'CONNECT', ':authority': cmd.authority });
    const sh = crypto.createHash('sha256');
    const rh = crypto.createHash('sha256');
    let received = 0;
    let status = null;
    req.on('response', (h) => {
      status = h[':status'];
      if (status !== 200) return;
      const chunks = randomChunks(size, cmd.chunk || 65536);
      const pump = () => {
        while (chunks.length) {
          const c = chunks.shift();
          sh.update(c);
          if (!req.write(c)) {
            req.once('drain', pump);
            return;
          }
        }
        req.end();
      };
      pump();
    });
    req.on('data', (c) => {
      received += c.length;
      rh.update(c);
    });
    req.on('error', () => {});
    req.on('close', () => {
      results[i] = { size, status, received, sentSha: sh.digest('hex'), recvSha: rh.digest('hex'), rstCode: req.rstCode };
      if (--pending === 0) emit({ ev: 'echo_result', id: cmd.id, results, state: session.state });
    });
  });
}

commands((cmd) => {
  switch (cmd.op) {
    case 'session':
      openSession(cmd.s);
      break;
    case 'open':
      open(cmd.s, cmd.n, cmd.authority, cmd.headers, true);
      break;
    case 'write':
      streams[cmd.n].write(Buffer.from(cmd.b64, 'base64'));
      break;
    case 'end':
      streams[cmd.n].end();
      break;
    case 'rst':
      streams[cmd.n].close(cmd.code === undefined ? NGHTTP2_CANCEL : cmd.code);
      break;
    case 'destroy':
      // Only RST_STREAM (INTERNAL_ERROR): close(code) would send END_STREAM first.
      streams[cmd.n].destroy(new Error('reset by the test'));
      break;
    case 'echo_many':
      echoMany(cmd);
      break;
    case 'close_session':
      sessions[cmd.s].close();
      break;
    case 'state':
      emit({ ev: 'state', s: cmd.s, state: sessions[cmd.s].state, settings: sessions[cmd.s].remoteSettings });
      break;
    default:
      emit({ ev: 'bad_command', op: cmd.op });
  }
  emit({ ev: 'done', op: cmd.op, n: cmd.n, s: cmd.s });
});

if (args.forward) {
  // A local TCP port whose connections become CONNECT streams on one pooled session
  // (another past 100 streams), as a node-local HBONE client would.
  let pool = [];
  let next = 0;
  const pick = () => {
    pool = pool.filter((x) => !x.closed && !x.destroyed);
    for (const x of pool) if (x.ztStreams < 100) return x;
    const key = `fwd${next++}`;
    const x = openSession(key);
    x.ztStreams = 0;
    pool.push(x);
    return x;
  };
  const srv = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => {
    const session = pick();
    session.ztStreams++;
    const req = session.request({ ':method': 'CONNECT', ':authority': args.target });
    req.on('response', (h) => {
      if (h[':status'] !== 200) {
        sock.resetAndDestroy();
        return;
      }
      sock.pipe(req);
      req.pipe(sock);
    });
    req.on('close', () => {
      session.ztStreams--;
      if (req.rstCode && !sock.destroyed) sock.resetAndDestroy(); // RST_STREAM -> RST
    });
    req.on('error', () => {});
    sock.on('error', () => {
      // RST -> RST_STREAM. req.close(code) would send END_STREAM first; destroy() does not.
      if (!req.destroyed) req.destroy(new Error('downstream reset'));
    });
  });
  const [fh, fp] = hostPort(args.forward);
  srv.listen(fp, fh, () => emit({ ev: 'listening', port: srv.address().port }));
}
process.on('SIGTERM', () => process.exit(0));
