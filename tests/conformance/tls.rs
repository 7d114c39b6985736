//! TLS with rustls: verified against a configured CA; plaintext only on loopback.

use std::sync::Arc;

use control_plane::server::{ServeError, TlsPem};
use control_plane::{ServerConfig, Settings, SystemClock};
use runner_proto::admin::v1 as admin;

fn certificates() -> (String, TlsPem) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    (
        ca.pem(),
        TlsPem {
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        },
    )
}

#[tokio::test]
async fn tls_is_verified_against_the_configured_ca() {
    let (ca_pem, identity) = certificates();
    let config = ServerConfig {
        tls: Some(identity),
        ..Default::default()
    };
    let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
    let cp = testkit::ControlPlane::start(config, plane)
        .await
        .expect("start");
    let url = format!("https://localhost:{}", cp.addr.port());

    let channel = control_plane::cli::connect(&url, Some(ca_pem.into_bytes()))
        .await
        .expect("TLS with the right CA");
    let mut client = admin::admin_service_client::AdminServiceClient::new(channel);
    client
        .list_runners(admin::ListRunnersRequest {})
        .await
        .expect("a call over TLS");

    // Without the CA the server's certificate is not trusted: the failure
    // is the certificate's, not any other (the server is up and answers).
    let untrusted = control_plane::cli::connect(&url, None).await;
    let failure = match untrusted {
        Err(err) => format!("{err:?}"),
        Ok(channel) => match admin::admin_service_client::AdminServiceClient::new(channel)
            .list_runners(admin::ListRunnersRequest {})
            .await
        {
            Err(status) => format!("{status:?}"),
            Ok(_) => panic!("an unknown CA was trusted"),
        },
    };
    assert!(
        failure.contains("UnknownIssuer"),
        "not refused for its certificate: {failure}"
    );

    // Plaintext against the TLS port fails too.
    let plain =
        control_plane::cli::connect(&format!("http://127.0.0.1:{}", cp.addr.port()), None).await;
    let failed = match plain {
        Err(_) => true,
        Ok(channel) => admin::admin_service_client::AdminServiceClient::new(channel)
            .list_runners(admin::ListRunnersRequest {})
            .await
            .is_err(),
    };
    assert!(failed, "plaintext must not reach a TLS server");
}

#[tokio::test]
async fn plaintext_is_refused_off_loopback() {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let plane = control_plane::ControlPlane::new(Settings::default(), Arc::new(SystemClock));
    let result = control_plane::serve(
        listener,
        ServerConfig::default(),
        plane,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(result, Err(ServeError::PlaintextNotLoopback(_))),
        "{result:?}"
    );
}
