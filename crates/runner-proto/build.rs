//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Relative, so that checkouts sharing one target directory each watch their own files.
    println!("cargo:rerun-if-changed=../../proto");
    // Read at run time: a build script compiled in another checkout sharing
    // this target directory must still find this checkout's files.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("runner/v1/identity.proto"),
        root.join("runner/v1/runner.proto"),
        root.join("admin/v1/admin.proto"),
    ];
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
