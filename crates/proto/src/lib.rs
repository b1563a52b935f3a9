//! The generated `engram.v1` messages, clients and servers, plus the descriptor set for gRPC reflection and a
//! helper that adds health and reflection to a server.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("engram.v1");
}

/// The encoded `FileDescriptorSet` of `engram.v1`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("engram_descriptor");

/// A gRPC reflection service (v1) describing `engram.v1`, so grpcurl-style tools can list and call its methods.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

#[cfg(test)]
mod tests {
    #[test]
    fn descriptor_names_every_service_and_reflection_builds() {
        let text = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for service in ["Coordinator", "Membership", "Replica"] {
            assert!(text.contains(service), "{service} missing from the descriptor set");
        }
        super::reflection().expect("reflection service builds from the descriptor set");
        // Generated types exist with their fields.
        let job = super::v1::Job { state: super::v1::JobState::Queued as i32, ..Default::default() };
        assert_eq!(job.state(), super::v1::JobState::Queued);
    }
}
