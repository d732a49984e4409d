//! `whepd-smol`: the standalone WHEP egress server on smol. See [`whep_smol::cli`].

fn main() -> std::process::ExitCode {
    whep_smol::cli::main()
}
