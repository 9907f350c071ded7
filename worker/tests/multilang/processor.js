// A KCL record processor written on the real aws-kcl npm library (`require('aws-kcl')`),
// exactly as it would run under KCL's Java MultiLangDaemon. kcg's multiLang tests run it
// unchanged. It logs the same events as processor.py (see there) to the file named by the
// first argument; "#cp" records are checkpointed at, the first "!crash" record throws (an
// uncaught exception ends the process).
'use strict';

const fs = require('fs');
const kcl = require('aws-kcl');

const logPath = process.argv[2];
let shard = null;

function log(line) {
  fs.appendFileSync(logPath, `${shard} ${line}\n`);
}

const recordProcessor = {
  initialize(input, completeCallback) {
    shard = input.shardId;
    log(`init ${input.sequenceNumber} ${input.subSequenceNumber}`);
    completeCallback();
  },

  processRecords(input, completeCallback) {
    const records = input.records;
    let i = 0;
    const next = () => {
      if (i >= records.length) {
        completeCallback();
        return;
      }
      const record = records[i++];
      const data = Buffer.from(record.data, 'base64').toString();
      if (data.endsWith('!crash')) {
        const marker = `${logPath}.crashed.${data}`;
        if (!fs.existsSync(marker)) {
          fs.writeFileSync(marker, '');
          log(`crash ${record.sequenceNumber}`);
          throw new Error(`poison record ${data}`);
        }
      }
      log(`record ${record.sequenceNumber} ${record.subSequenceNumber} ${data}`);
      if (data.endsWith('#cp')) {
        input.checkpointer.checkpoint(record.sequenceNumber, (err) => {
          log(err ? `checkpoint-error ${record.sequenceNumber} ${err}` : `checkpoint ${record.sequenceNumber}`);
          next();
        });
      } else {
        next();
      }
    };
    next();
  },

  leaseLost(input, completeCallback) {
    log('leaseLost');
    completeCallback();
  },

  shardEnded(input, completeCallback) {
    input.checkpointer.checkpoint((err) => {
      log(err ? `shardEnded-error ${err}` : 'shardEnded');
      completeCallback();
    });
  },

  shutdownRequested(input, completeCallback) {
    log('shutdownRequested');
    completeCallback();
  },
};

kcl(recordProcessor).run();
