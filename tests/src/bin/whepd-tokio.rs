//! `whepd` on tokio, built inside the end-to-end crate so that the suite can run it
//! (`CARGO_BIN_EXE_whepd-tokio`). Identical to the `whepd` binary of `whep-tokio`.

fn main() -> std::process::ExitCode {
    whep_tokio::cli::main()
}
