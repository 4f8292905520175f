#!/usr/bin/env node
// Drives hostd's HostSwitch API from Node.js: exposes a port, lists the forwards, reads the
// counters and unexposes the port again, printing each step.
//
//   npm ci && node example.js --api unix:///run/netferry/hostd.sock \
//       --local 127.0.0.1:8080 --remote 192.168.127.2:80
//
// The service is loaded at run time from proto/netferry/v1/host.proto with proto-loader (no
// generated code); google/protobuf/{duration,timestamp}.proto come with protobufjs. A failed
// call prints the gRPC status code and hostd's message and exits 1.
'use strict';

const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTOCOLS = { tcp: 'PROTOCOL_TCP', udp: 'PROTOCOL_UDP', unix: 'PROTOCOL_UNIX' };
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

function usage(message) {
  console.error(`error: ${message}`);
  console.error(
    'usage: node example.js --api unix:///path [--protocol tcp|udp|unix] ' +
      '[--local 127.0.0.1:8080] [--remote 192.168.127.2:80] [--timeout SECONDS] [--keep]',
  );
  process.exit(2);
}

// unix:///path, a bare /path, tcp://host:port or host:port, as the Python SDK accepts.
function grpcTarget(api) {
  if (api.startsWith('/')) return `unix://${api}`;
  if (api.startsWith('tcp://')) return api.slice('tcp://'.length);
  return api;
}

function loadService() {
  const definition = protoLoader.loadSync(path.join('netferry', 'v1', 'host.proto'), {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto: bytes_to_guest, frames_in, ...
    longs: String, // uint64 counters as decimal strings (no precision lost)
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).netferry.v1.HostSwitch;
}

function call(client, method, request, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutSeconds * 1000);
    client[method](request, { deadline }, (err, response) => {
      if (err) {
        err.step = method;
        reject(err);
      } else {
        resolve(response);
      }
    });
  });
}

function timestamp(ts) {
  if (!ts) return '-';
  const ms = Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6);
  return new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');
}

function describe(f) {
  const proto = f.protocol.replace(/^PROTOCOL_/, '').toLowerCase();
  return (
    `${proto} ${f.local} -> ${f.remote} ` +
    `(active ${f.active}, total ${f.total}, created ${timestamp(f.created)})`
  );
}

async function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        api: { type: 'string', default: process.env.NETFERRY_API || '' },
        protocol: { type: 'string', default: 'tcp' },
        local: { type: 'string', default: '127.0.0.1:8080' },
        remote: { type: 'string', default: '192.168.127.2:80' },
        timeout: { type: 'string', default: '10' },
        keep: { type: 'boolean', default: false },
      },
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!values.api) usage('--api is required (or set NETFERRY_API)');
  const protocol = PROTOCOLS[values.protocol.toLowerCase()];
  if (!protocol) usage(`--protocol ${JSON.stringify(values.protocol)}: expected tcp, udp or unix`);
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) usage(`--timeout ${JSON.stringify(values.timeout)}: expected seconds > 0`);

  const HostSwitch = loadService();
  const client = new HostSwitch(grpcTarget(values.api), grpc.credentials.createInsecure());
  try {
    await new Promise((resolve, reject) =>
      client.waitForReady(new Date(Date.now() + timeout * 1000), (err) =>
        err ? reject(Object.assign(err, { step: `connect ${values.api}` })) : resolve(),
      ),
    );
    console.log(`connected: ${values.api}`);

    const exposed = await call(
      client,
      'Expose',
      { protocol, local: values.local, remote: values.remote },
      timeout,
    );
    console.log(`exposed: ${describe(exposed.forward)}`);

    const list = await call(client, 'ListForwards', {}, timeout);
    console.log(`forwards: ${list.forwards.length}`);
    for (const f of list.forwards) console.log(`  forward: ${describe(f)}`);

    const { stats: s } = await call(client, 'GetStats', {}, timeout);
    console.log(
      `stats: frames_in=${s.frames_in} frames_out=${s.frames_out} bytes_in=${s.bytes_in} ` +
        `bytes_out=${s.bytes_out} forwards=${s.forwards} tcp_connections=${s.tcp_connections} ` +
        `udp_flows=${s.udp_flows} links=${s.links.length} ` +
        `counters=${Object.keys(s.counters).length}`,
    );

    if (values.keep) {
      console.log('kept: the forward stays in place (--keep)');
      return;
    }
    const removed = await call(
      client,
      'Unexpose',
      { protocol, local: exposed.forward.local },
      timeout,
    );
    console.log(`unexposed: ${describe(removed.forward)}`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const code = CODE_NAMES[err.code];
  const step = err.step ? `${err.step}: ` : '';
  if (code !== undefined && err.details !== undefined) {
    console.error(`error: ${step}${code}: ${err.details}`);
  } else {
    console.error(`error: ${step}${err.message || err}`);
  }
  process.exit(1);
});
