//! `whepd`: a standalone WHEP egress server on tokio. See [`whep_tokio::cli`].

fn main() -> std::process::ExitCode {
    whep_tokio::cli::main()
}
