//! Compiles `proto/assistant.proto` at build time with the pure-Rust `protox` compiler,
//! so no system `protoc` is needed, and generates the tonic code from its descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["assistant.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
