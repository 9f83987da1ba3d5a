//! The private server launcher against a real `nats-server`: it starts on
//! its own port with JetStream, keeps stored messages across a restart,
//! and is gone after drop; from a configuration file it still takes its
//! own port and store.

use std::time::Duration;

use dispatcher_nats::{LocalServer, LocalServerError};

#[tokio::test]
async fn starts_with_jetstream_survives_restart_and_stops_on_drop() {
    let mut server =
        LocalServer::start().expect("nats-server must be installed (scripts/test installs it)");
    assert_ne!(
        server.port(),
        4222,
        "must never use the machine-wide server"
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .expect("JetStream is enabled");
    js.publish("t.a", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();

    server.restart().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = tokio::time::timeout(Duration::from_secs(10), js.get_stream("T"))
        .await
        .expect("stream lookup within 10 s")
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    let port = server.port();
    drop(server);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn a_configuration_file_runs_on_its_own_port_and_store() {
    // Written for production: the machine's port and a store elsewhere.
    let conf = "listen: 0.0.0.0:4222\n\
                jetstream {\n  store_dir: \"/nonexistent/nats\"\n}\n\
                authorization { user: u, password: p }\n";
    let server = LocalServer::start_with_config(conf).unwrap();
    assert_ne!(server.port(), 4222);
    assert!(
        async_nats::connect(server.url()).await.is_err(),
        "auth applies"
    );
    let client = async_nats::ConnectOptions::with_user_and_password("u".into(), "p".into())
        .connect(server.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .expect("JetStream in the launcher's own store");
    assert!(server.log().contains("Server is ready"), "{}", server.log());

    assert!(matches!(
        LocalServer::start_with_config("listen: {"),
        Err(LocalServerError::Config(_))
    ));
}
