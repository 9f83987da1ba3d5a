//! The private server launcher against a real `nats-server`: it starts on
//! its own port with JetStream, keeps stored messages across a restart,
//! and is gone after drop.

use std::time::Duration;

use dispatcher_nats::LocalServer;

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
