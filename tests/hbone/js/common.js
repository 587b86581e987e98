// Shared helpers of the Node.js HBONE peers: arguments, JSON-lines I/O, TLS material,
// SPIFFE ID checks, stream bookkeeping. Events go to stdout one JSON object per line;
// commands come from stdin the same way (see h2_server.js / h2_client.js).
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const readline = require('readline');

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) out[k] = argv[++i];
    else out[k] = true;
  }
  return out;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// "ip:port" / "[ip6]:port" -> [host, port]
function hostPort(s) {
  const i = s.lastIndexOf(':');
  return [s.slice(0, i).replace(/^\[|\]$/g, ''), Number(s.slice(i + 1))];
}

function tlsMaterial(args) {
  return {
    cert: fs.readFileSync(args.cert),
    key: fs.readFileSync(args.key),
    ca: fs.readFileSync(args.ca),
    minVersion: 'TLSv1.3',
  };
}

// The URI SANs of a peer certificate (Node formats them as "URI:spiffe://...").
function uriSans(cert) {
  return (cert && cert.subjectaltname ? cert.subjectaltname.split(', ') : [])
    .filter((s) => s.startsWith('URI:'))
    .map((s) => s.slice(4));
}

// Per-stream accounting: bytes and SHA-256 both ways, how the stream ended.
function track(stream, info, { keepData }) {
  info.received = 0;
  info.sent = 0;
  info.endSeen = false;
  const rh = crypto.createHash('sha256');
  const sh = crypto.createHash('sha256');
  info.recvHash = rh;
  info.sentHash = sh;
  stream.on('data', (chunk) => {
    info.received += chunk.length;
    rh.update(chunk);
    if (keepData) emit({ ev: 'data', n: info.n, b64: chunk.toString('base64') });
  });
  stream.on('end', () => {
    info.endSeen = true;
    emit({ ev: 'end', n: info.n });
  });
  const write = stream.write.bind(stream);
  stream.write = (chunk, ...rest) => {
    const b = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk);
    info.sent += b.length;
    sh.update(b);
    return write(b, ...rest);
  };
  stream.on('error', (e) => emit({ ev: 'stream_error', n: info.n, error: String(e && e.code || e) }));
  stream.on('close', () => {
    emit({
      ev: 'close',
      n: info.n,
      rstCode: stream.rstCode,
      endSeen: info.endSeen,
      received: info.received,
      recvSha: rh.digest('hex'),
      sent: info.sent,
      sentSha: sh.digest('hex'),
    });
  });
}

function commands(handler) {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    if (!line.trim()) return;
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (e) {
      emit({ ev: 'bad_command', line });
      return;
    }
    try {
      handler(cmd);
    } catch (e) {
      emit({ ev: 'command_error', op: cmd.op, error: String(e && e.stack || e) });
    }
  });
  rl.on('close', () => process.exit(0));
}

module.exports = { parseArgs, emit, hostPort, tlsMaterial, uriSans, track, commands };
