//! `kcg-operator`: see [`kcg_operator::cli`].

// One thread: the operator waits on the API server and DynamoDB, and a single-threaded
// runtime keeps one malloc arena instead of one per worker thread (its RSS is a budget:
// bench/README.md, operator rows).
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    kcg_operator::cli::main().await
}
