//! Generates the decree.v1 gRPC code with protox (a pure-Rust protobuf
//! compiler), so building decree needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "decree/v1/common.proto",
        "decree/v1/coordinator.proto",
        "decree/v1/participant.proto",
        "decree/v1/registry.proto",
        "decree/v1/kv.proto",
        "decree/v1/replica.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    // The encoded descriptors, for the gRPC reflection service.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("decree_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
