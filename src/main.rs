//! `kcg-operator`: see [`kcg_operator::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kcg_operator::cli::main().await
}
