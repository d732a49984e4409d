//! `whepd` on smol, built inside the end-to-end crate so that the suite can run it
//! (`CARGO_BIN_EXE_whepd-smol-e2e`; a different name from whep-smol's `whepd-smol`, since two packages may not build one output file). Identical to the `whepd-smol` binary of `whep-smol`.

fn main() -> std::process::ExitCode {
    whep_smol::cli::main()
}
