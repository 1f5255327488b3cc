//! Generates the gossip gRPC code from `proto/` with protox: no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/strait/discovery/v1/gossip.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Ordered maps: a service encodes to the same bytes everywhere, so its hash (what an
        // origin signs) is the same for every member.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
