// Side-by-side peer for kcg-bench: lifion-kinesis (npm) consuming a stream kcg-bench filled.
// One consumer, polling, TRIM_HORIZON, up to 10,000 records per GetRecords and 200 ms
// between calls (kcg's rate-limit gap), its own consumer group and DynamoDB table.
//
// Input (env): PEER_STREAM, PEER_TABLE, PEER_COUNT, PEER_TIMEOUT_MS, and the standard
// AWS_ENDPOINT_URL_KINESIS / AWS_ENDPOINT_URL_DYNAMODB / AWS_REGION and credentials.
// Output: one JSON line on stdout:
//   {"count":N,"repeated":R,"firstMs":..,"lastMs":..,"cpuUs":..,"maxRssKiB":..,"complete":true}
// with times and CPU (user + system, microseconds) from just before `new Kinesis(...)` to the
// last record. Exit code 0 when complete.
'use strict';

const { performance } = require('perf_hooks');
const Kinesis = require('lifion-kinesis');

const need = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`lifion-consume: ${name} is not set`);
    process.exit(2);
  }
  return v;
};

const stream = need('PEER_STREAM');
const table = need('PEER_TABLE');
const target = Number(need('PEER_COUNT'));
const timeoutMs = Number(process.env.PEER_TIMEOUT_MS || 120000);
const region = process.env.AWS_REGION || 'us-east-1';

const t0 = performance.now();
const cpu0 = process.cpuUsage();
let count = 0;
let cpuUs = null;
let repeated = 0;
let firstMs = null;
let lastMs = null;
const lastSeq = new Map();
let done = false;

const quiet = { debug() {}, info() {}, warn() {}, error: (...a) => console.error(...a) };
const consumer = new Kinesis({
  streamName: stream,
  consumerGroup: `${stream}-lifion`,
  createStreamIfNeeded: false,
  endpoint: need('AWS_ENDPOINT_URL_KINESIS'),
  region,
  dynamoDb: { endpoint: need('AWS_ENDPOINT_URL_DYNAMODB'), region, tableName: table },
  initialPositionInStream: 'TRIM_HORIZON',
  limit: 10000,
  pollDelay: 200,
  noRecordsPollDelay: 250,
  shouldParseJson: false,
  shouldDeaggregate: false,
  statsInterval: 3600000,
  logger: quiet,
});

const finish = async (complete) => {
  if (done) return;
  done = true;
  const out = {
    count,
    repeated,
    firstMs,
    lastMs,
    cpuUs,
    maxRssKiB: process.resourceUsage().maxRSS,
    complete,
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  try {
    await Promise.race([consumer.stopConsumer(), new Promise((r) => setTimeout(r, 5000))]);
  } catch (e) {
    console.error(`lifion-consume: stopConsumer: ${e}`);
  }
  process.exit(complete ? 0 : 1);
};

consumer.on('data', ({ records, shardId }) => {
  if (done) return;
  const now = performance.now() - t0;
  if (firstMs === null) firstMs = now;
  let high = lastSeq.get(shardId);
  for (const r of records) {
    const seq = BigInt(r.sequenceNumber);
    if (high === undefined || seq > high) {
      high = seq;
      count += 1;
    } else {
      repeated += 1;
    }
  }
  lastSeq.set(shardId, high);
  lastMs = now;
  if (count >= target) {
    const cpu = process.cpuUsage(cpu0);
    cpuUs = cpu.user + cpu.system;
    finish(true);
  }
});
consumer.on('error', (e) => console.error(`lifion-consume: ${e}`));

setTimeout(() => finish(false), timeoutMs);
consumer.startConsumer().catch((e) => {
  console.error(`lifion-consume: startConsumer: ${e}`);
  finish(false);
});
