#!/usr/bin/env node
// HTTP/2 CONNECT server over mutual TLS 1.3 with Node's built-in http2: the independent
// HBONE server ztun's outbound talks to in the interop tests.
//
//   node h2_server.js --listen 127.0.0.1:0 --cert C --key K --ca CA
//        [--expect-client spiffe://...] [--mode echo|proxy|script] [--settings JSON]
//
// Verifies the client's chain against CA (rejectUnauthorized) and, with --expect-client,
// that its URI SAN is that SPIFFE ID. For every CONNECT stream it reports the request
// headers as received (decoded and raw), the SETTINGS and connection window the client
// gave, and how the stream ended (END_STREAM seen, RST_STREAM code, bytes and SHA-256 both
// ways). Modes: echo (200, echo, END_STREAM after the client's), proxy (dial :authority,
// 200 after the TCP connect, 503 on failure; FIN <-> END_STREAM, RST <-> RST_STREAM),
// script (wait for commands: respond, write, end, rst, goaway).
'use strict';
const http2 = require('http2');
const net = require('net');
const { parseArgs, emit, hostPort, tlsMaterial, uriSans, track, commands } = require('./common');

const args = parseArgs(process.argv.slice(2));
const mode = args.mode || 'echo';
const settings = args.settings ? JSON.parse(args.settings) : {};

const server = http2.createSecureServer({
  ...tlsMaterial(args),
  requestCert: true,
  rejectUnauthorized: true,
  allowHTTP1: false,
  settings,
});

const sessions = [];
const streams = [];

server.on('tlsClientError', (e) => emit({ ev: 'tls_error', error: String(e && e.code || e) }));
server.on('session', (session) => {
  const conn = sessions.length;
  sessions.push(session);
  session.ztConn = conn;
  const sock = session.socket;
  const sans = uriSans(sock.getPeerCertificate());
  emit({
    ev: 'session',
    conn,
    alpn: sock.alpnProtocol,
    tls: sock.getProtocol(),
    cipher: sock.getCipher().name,
    peerSans: sans,
    servername: sock.servername || null,
    remote: [sock.remoteAddress, sock.remotePort],
  });
  if (args['expect-client'] && !sans.includes(args['expect-client'])) {
    emit({ ev: 'bad_peer', conn, peerSans: sans });
    session.destroy();
    return;
  }
  session.on('remoteSettings', (s) => emit({ ev: 'remote_settings', conn, settings: s, state: session.state }));
  session.on('goaway', (code, last) => emit({ ev: 'goaway', conn, code, lastStreamID: last }));
  session.on('error', (e) => emit({ ev: 'session_error', conn, error: String(e && e.code || e) }));
  session.on('frameError', (type, code, id) => emit({ ev: 'frame_error', conn, type, code, id }));
  session.on('close', () => emit({ ev: 'session_close', conn }));
});

server.on('stream', (stream, headers, flags, rawHeaders) => {
  const n = streams.length;
  const info = { n };
  streams.push({ stream, info });
  const session = stream.session;
  session.ztLast = Math.max(session.ztLast || 0, stream.id);
  emit({
    ev: 'stream',
    n,
    conn: session.ztConn,
    id: stream.id,
    headers,
    raw: rawHeaders,
    endStream: !!(flags & http2.constants.NGHTTP2_FLAG_END_STREAM),
    remoteSettings: session.remoteSettings,
    state: session.state,
  });
  track(stream, info, { keepData: mode === 'script' });
  if (mode === 'script') return;
  if (headers[':method'] !== 'CONNECT' || !headers[':authority']) {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  if (mode === 'echo') {
    stream.respond({ ':status': 200 });
    stream.pipe(stream);
    return;
  }
  // proxy
  const [host, port] = hostPort(headers[':authority']);
  const up = net.connect({ host, port, allowHalfOpen: true });
  let connected = false;
  up.setNoDelay(true);
  up.on('connect', () => {
    connected = true;
    stream.respond({ ':status': 200 });
    up.pipe(stream);
    stream.pipe(up);
  });
  up.on('error', (e) => {
    emit({ ev: 'upstream_error', n, error: String(e && e.code || e) });
    if (!connected) {
      if (!stream.destroyed) stream.respond({ ':status': 503 }, { endStream: true });
    } else if (!stream.destroyed) {
      // The TCP side was reset. stream.close(code) would send END_STREAM before its
      // RST_STREAM (Node ends the writable side first); destroy() sends RST_STREAM only.
      stream.destroy(new Error(`upstream ${e.code}`));
    }
  });
  stream.on('close', () => {
    if (stream.rstCode && !up.destroyed) up.resetAndDestroy(); // RST_STREAM -> RST
  });
  stream.on('error', () => {});
});

commands((cmd) => {
  const s = cmd.n !== undefined ? streams[cmd.n] && streams[cmd.n].stream : null;
  switch (cmd.op) {
    case 'respond':
      s.respond({ ':status': cmd.status, ...(cmd.headers || {}) }, { endStream: !!cmd.endStream });
      break;
    case 'write':
      s.write(Buffer.from(cmd.b64, 'base64'));
      break;
    case 'end':
      s.end();
      break;
    case 'rst':
      s.close(cmd.code === undefined ? http2.constants.NGHTTP2_CANCEL : cmd.code);
      break;
    case 'destroy':
      // Only RST_STREAM (INTERNAL_ERROR): close(code) would send END_STREAM first.
      s.destroy(new Error('reset by the test'));
      break;
    case 'goaway': {
      // lastStreamID: the streams in progress stay valid (a graceful GOAWAY).
      const sess = sessions[cmd.conn];
      sess.goaway(cmd.code || 0, cmd.last !== undefined ? cmd.last : sess.ztLast || 0);
      break;
    }
    case 'ping':
      sessions[cmd.conn].ping((err) => emit({ ev: 'pong', conn: cmd.conn, error: err ? String(err) : null }));
      break;
    case 'state':
      emit({ ev: 'state', conn: cmd.conn, state: sessions[cmd.conn].state });
      break;
    default:
      emit({ ev: 'bad_command', op: cmd.op });
  }
  emit({ ev: 'done', op: cmd.op, n: cmd.n });
});

const [lh, lp] = hostPort(args.listen || '127.0.0.1:0');
server.listen(lp, lh, () => emit({ ev: 'listening', port: server.address().port }));
process.on('SIGTERM', () => process.exit(0));
