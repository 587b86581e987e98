#!/usr/bin/env node
// HBONE-like baseline for the benchmarks: HTTP/2 CONNECT over mutual TLS 1.3, with Node's
// http2 (nghttp2 inside), set up like ztunnel's HBONE: stream window 4 MiB, connection
// window 16 MiB, max frame 1 MiB, one pooled connection (a new one past 100 streams),
// TCP_NODELAY, streams ended with END_STREAM (RST_STREAM only on errors: nghttp2 drops a
// connection after ~1000 received resets).
//
//   node h2connect.js server --listen 127.0.0.1:0 --cert C --key K --ca CA
//   node h2connect.js client --listen 127.0.0.1:0 --to HOST:PORT --target HOST:PORT \
//        --cert C --key K --ca CA [--peer-id spiffe://...]
// Prints "READY <port>"; exits when stdin closes or on SIGTERM.
'use strict';
const http2 = require('http2');
const net = require('net');
const tlsLib = require('tls');
const fs = require('fs');

const args = {};
for (let i = 3; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const mode = process.argv[2];
const hp = (s) => { const i = s.lastIndexOf(':'); return [s.slice(0, i).replace(/^\[|\]$/g, ''), +s.slice(i + 1)]; };
const SETTINGS = { initialWindowSize: 4 << 20, maxFrameSize: 1 << 20, maxConcurrentStreams: 200 };
const CONN_WINDOW = 16 << 20;
const MAX_STREAMS_PER_CONN = 100;
const tls = {
  cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key), ca: fs.readFileSync(args.ca),
  minVersion: 'TLSv1.3',
};
const { NGHTTP2_CANCEL } = http2.constants;

function ready(server) {
  server.listen(hp(args.listen)[1], hp(args.listen)[0], () => {
    process.stdout.write(`READY ${server.address().port}\n`);
  });
  const stop = () => { server.close(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}

if (mode === 'server') {
  const server = http2.createSecureServer({
    ...tls, requestCert: true, rejectUnauthorized: true, settings: SETTINGS, allowHTTP1: false,
  });
  server.on('connection', (sock) => sock.setNoDelay(true));
  server.on('session', (s) => s.setLocalWindowSize(CONN_WINDOW));
  server.on('stream', (stream, headers) => {
    if (headers[':method'] !== 'CONNECT' || !headers[':authority']) {
      stream.respond({ ':status': 400 }, { endStream: true });
      return;
    }
    const [host, port] = hp(headers[':authority']);
    const up = net.connect({ host, port, noDelay: true });
    let responded = false;
    up.on('connect', () => {
      responded = true;
      stream.respond({ ':status': 200 });
      up.pipe(stream);
      stream.pipe(up);
    });
    up.on('error', () => {
      if (!responded) { responded = true; stream.respond({ ':status': 503 }, { endStream: true }); }
      else stream.close(NGHTTP2_CANCEL);
    });
    stream.on('error', () => up.destroy());
    stream.on('close', () => { if (stream.rstCode) up.destroy(); });
  });
  ready(server);
} else if (mode === 'client') {
  const [toHost, toPort] = hp(args.to);
  let pool = [];
  function getSession() {
    pool = pool.filter((x) => !x.closed && !x.destroyed);
    for (const x of pool) if (x.ztStreams < MAX_STREAMS_PER_CONN) return x;
    const s = http2.connect(`https://${toHost}:${toPort}`, {
      settings: SETTINGS,
      createConnection: () => {
        const t = tlsLib.connect({
          ...tls, host: toHost, port: toPort, servername: '', ALPNProtocols: ['h2'],
          checkServerIdentity: (host, cert) => {
            if (args['peer-id'] && !(cert.subjectaltname || '').split(', ').includes(`URI:${args['peer-id']}`))
              return new Error(`peer is not ${args['peer-id']}`);
            return undefined;
          },
        });
        t.setNoDelay(true);
        return t;
      },
    });
    s.ztStreams = 0;
    s.on('connect', (x) => x.setLocalWindowSize(CONN_WINDOW));
    s.on('error', () => {});
    pool.push(s);
    return s;
  }
  const server = net.createServer({ noDelay: true }, (sock) => {
    sock.setNoDelay(true);
    const s = getSession();
    s.ztStreams++;
    const req = s.request({ ':method': 'CONNECT', ':authority': args.target });
    req.on('response', (h) => {
      if (h[':status'] !== 200) { sock.destroy(); return; }
      sock.pipe(req);
      req.pipe(sock);
    });
    req.on('close', () => { s.ztStreams--; if (req.rstCode) sock.destroy(); });
    req.on('error', () => sock.destroy());
    sock.on('error', () => req.close(NGHTTP2_CANCEL));
  });
  ready(server);
} else {
  process.stderr.write('usage: h2connect.js server|client ...\n');
  process.exit(2);
}
