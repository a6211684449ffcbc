//! RabbitMQ connections: `amqp://` and `amqps://`, with an optional private CA.

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::config::AmqpConfig;
use crate::observability::DependencyStatus;
use crate::shutdown::Shutdown;

/// Why an AMQP connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The CA file could not be read.
    #[error("cannot read amqp.tls_ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    /// The broker refused or could not be reached.
    #[error("amqp: {0}")]
    Lapin(#[from] lapin::Error),
}

/// Connects once, naming the connection after the service so it shows in RabbitMQ's tools.
pub async fn connect(config: &AmqpConfig, connection_name: &str) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let mut builder = DefaultConnectionBuilder::new()?
        .with_uri_str(config.url.expose().to_string())
        .with_properties(properties);
    if let Some(path) = &config.tls_ca_file {
        let pem = std::fs::read_to_string(path).map_err(|source| AmqpError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        builder = builder.with_tls_config(OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        });
    }
    Ok(builder.connect().await?)
}

/// Connects with backoff until the broker accepts, marking `status`. `None` means shutdown
/// came first.
pub async fn connect_with_retry(
    config: &AmqpConfig,
    connection_name: &str,
    status: &DependencyStatus,
    shutdown: &Shutdown,
) -> Option<Connection> {
    tracing::info!(url = %config.url, "Connecting to RabbitMQ.");
    let conn = crate::retry::until_ok("amqp connect", shutdown, || {
        connect(config, connection_name)
    })
    .await?;
    status.set_up(true);
    Some(conn)
}
