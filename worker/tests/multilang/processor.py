"""A KCL record processor written on the real amazon_kclpy library (KCLProcess + a v3
RecordProcessorBase), exactly as it would run under KCL's Java MultiLangDaemon. kcg's
multiLang tests run it unchanged.

It appends one line per event to the file named by argv[1], each prefixed by its shard:
  <shard> init <sequenceNumber> <subSequenceNumber>
  <shard> record <sequenceNumber> <subSequenceNumber> <data>
  <shard> checkpoint <sequenceNumber>      (or checkpoint-error <sequenceNumber> <error>)
  <shard> crash <sequenceNumber>
  <shard> shardEnded | shutdownRequested | leaseLost
A record whose data ends in "#cp" is checkpointed at (its sequence and sub-sequence); one
ending in "!crash" makes the process exit the first time it is seen (a marker file next to
the log remembers it), before it is logged; one ending in "!garbage" makes it write a status
line for the wrong action instead (once) and wait. With "--no-shard-end-checkpoint" after the log
path, shard_ended logs "shardEnded-unchecked" and does not checkpoint (a processor breaking
KCL's rule).
"""
import os
import sys

from amazon_kclpy import kcl
from amazon_kclpy.v3 import processor


class RecordProcessor(processor.RecordProcessorBase):
    def __init__(self, log_path, checkpoint_shard_end):
        self.log_path = log_path
        self.checkpoint_shard_end = checkpoint_shard_end
        self.shard = None

    def log(self, line):
        with open(self.log_path, "a") as f:
            f.write("{} {}\n".format(self.shard, line))

    def initialize(self, initialize_input):
        self.shard = initialize_input.shard_id
        self.log("init {} {}".format(initialize_input.sequence_number, initialize_input.sub_sequence_number))

    def process_records(self, process_records_input):
        for record in process_records_input.records:
            data = record.binary_data.decode()
            if data.endswith("!crash") or data.endswith("!garbage"):
                marker = "{}.crashed.{}".format(self.log_path, data)
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    self.log("crash {}".format(record.sequence_number))
                    if data.endswith("!crash"):
                        sys.stderr.write("poison record {}, exiting\n".format(data))
                        sys.exit(3)
                    # A processor gone wrong: a protocol line kcg never asked for.
                    sys.stdout.write('\n{"action": "status", "responseFor": "initialize"}\n')
                    sys.stdout.flush()
                    sys.stdin.readline()  # waits for kcg's answer: it kills us instead
            self.log("record {} {} {}".format(record.sequence_number, record.sub_sequence_number, data))
            if data.endswith("#cp"):
                try:
                    process_records_input.checkpointer.checkpoint(record.sequence_number, record.sub_sequence_number)
                    self.log("checkpoint {}".format(record.sequence_number))
                except kcl.CheckpointError as e:
                    self.log("checkpoint-error {} {}".format(record.sequence_number, e.value))

    def lease_lost(self, lease_lost_input):
        self.log("leaseLost")

    def shard_ended(self, shard_ended_input):
        if not self.checkpoint_shard_end:
            self.log("shardEnded-unchecked")
            return
        shard_ended_input.checkpointer.checkpoint()
        self.log("shardEnded")

    def shutdown_requested(self, shutdown_requested_input):
        self.log("shutdownRequested")


if __name__ == "__main__":
    kcl.KCLProcess(RecordProcessor(sys.argv[1], "--no-shard-end-checkpoint" not in sys.argv[2:])).run()
