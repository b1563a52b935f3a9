//! Compiles `proto/engram/v1` with protox (a Rust protobuf compiler), so building Engram's own protos needs no
//! protoc; the encoded descriptor set is kept for gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!: a build-script binary reused from a checkout elsewhere (another
    // worktree sharing the target directory) must still find this checkout's protos.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([root.join("engram/v1/engram.proto")], [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("engram_descriptor.bin"), fds.encode_to_vec())?;
    // Chunk data as `Bytes`: relays keep and forward every chunk without copying it.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".engram.v1.StageChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
