//! The Tokio runtime `kcg-worker` runs on (and the benchmark measures).
//!
//! One thread by default. A worker's work is waiting on Kinesis, DynamoDB and the sink;
//! the CPU part (mostly the SDK parsing GetRecords pages) takes ~2 us per 200-byte record,
//! so one core keeps up with ~450,000 records/s, while Kinesis caps every shard at 2 MB/s
//! (~10,000 such records/s). A multi-threaded runtime adds cross-thread wake-ups and more
//! allocator arenas: on the benchmark (`bench/`) it cost 10-15% more CPU per record and ~30%
//! more peak RSS, with no throughput gain. Pods scale out with replicas, not threads.

/// Default number of runtime threads.
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Builds the runtime: a current-thread runtime for `threads <= 1`, a multi-threaded one
/// with `threads` workers otherwise. Timers and I/O are enabled either way.
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn thread_count_picks_the_flavor() {
        for (threads, flavor) in [
            (0, RuntimeFlavor::CurrentThread),
            (1, RuntimeFlavor::CurrentThread),
            (3, RuntimeFlavor::MultiThread),
        ] {
            let rt = build(threads).expect("runtime");
            assert_eq!(rt.handle().runtime_flavor(), flavor, "{threads} threads");
            // Timers and I/O are enabled: a sleep completes.
            rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(1)).await });
        }
    }
}
