//! A registrar served by another node ([`super::server`]), reached over HTTP.

use async_trait::async_trait;

use super::*;
use crate::auth::Signer;
use crate::client::{Client, Endpoint, Response};

pub struct RemoteRegistrar {
    endpoint: Endpoint,
    /// Path prefix of the registrar's routes (`/registrar` when an agent serves it).
    prefix: String,
}

impl RemoteRegistrar {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            prefix: String::new(),
        })
    }

    pub fn with_prefix(url: &str, prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            prefix: prefix.to_string(),
        })
    }

    async fn call(
        &self,
        signer: Option<(&KeyPair, Signer)>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, RegistrarError> {
        let mut client = Client::new(self.endpoint.clone());
        if let Some((key, s)) = signer {
            client = client.signed(key.clone(), s);
        }
        client
            .request(method, &format!("{}{path}", self.prefix), body)
            .await
            .map_err(|e| RegistrarError::Unreachable(format!("{}: {e:#}", self.endpoint)))
    }

    async fn get_opt<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, RegistrarError> {
        let resp = self.call(None, "GET", path, None).await?;
        match resp.status {
            404 => Ok(None),
            s if (200..300).contains(&s) => resp
                .json()
                .map(Some)
                .map_err(|e| RegistrarError::Garbage(format!("{e:#}"))),
            _ => Err(refusal(&resp)),
        }
    }

    async fn write<T: serde::de::DeserializeOwned>(
        &self,
        key: &KeyPair,
        signer: Signer,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Option<T>, RegistrarError> {
        let body = serde_json::to_vec(body).map_err(|e| RegistrarError::Garbage(e.to_string()))?;
        let resp = self
            .call(Some((key, signer)), "POST", path, Some(body))
            .await?;
        if !resp.ok() {
            return Err(refusal(&resp));
        }
        if resp.status == 204 {
            return Ok(None);
        }
        resp.json()
            .map(Some)
            .map_err(|e| RegistrarError::Garbage(format!("{e:#}")))
    }
}

fn refusal(resp: &Response) -> RegistrarError {
    let msg = format!("{} {}", resp.status, resp.error_message());
    if resp.status >= 500 {
        RegistrarError::Unreachable(msg)
    } else {
        RegistrarError::Refused(msg)
    }
}

fn garbage() -> RegistrarError {
    RegistrarError::Garbage("empty answer".into())
}

#[async_trait]
impl Registrar for RemoteRegistrar {
    async fn twin(&self, id: TwinId) -> Result<Option<Twin>, RegistrarError> {
        self.get_opt(&format!("/twins/{id}")).await
    }
    async fn twin_by_key(&self, key: &PublicKey) -> Result<Option<Twin>, RegistrarError> {
        self.get_opt(&format!(
            "/twins?public_key={}",
            hex::encode(key.as_bytes())
        ))
        .await
    }
    async fn create_twin(&self, key: &KeyPair) -> Result<Twin, RegistrarError> {
        self.write(
            key,
            Signer::Key(key.public()),
            "/twins",
            &serde_json::json!({}),
        )
        .await?
        .ok_or_else(garbage)
    }
    async fn farm(&self, id: FarmId) -> Result<Option<Farm>, RegistrarError> {
        self.get_opt(&format!("/farms/{id}")).await
    }
    async fn create_farm(
        &self,
        owner: &KeyPair,
        owner_twin: TwinId,
        name: &str,
    ) -> Result<Farm, RegistrarError> {
        self.write(
            owner,
            Signer::Twin(owner_twin),
            "/farms",
            &serde_json::json!({ "name": name }),
        )
        .await?
        .ok_or_else(garbage)
    }
    async fn node_by_twin(&self, twin: TwinId) -> Result<Option<Node>, RegistrarError> {
        self.get_opt(&format!("/nodes?twin_id={twin}")).await
    }
    async fn register_node(
        &self,
        key: &KeyPair,
        twin: TwinId,
        info: &NodeInfo,
    ) -> Result<Node, RegistrarError> {
        match self.write(key, Signer::Twin(twin), "/nodes", info).await {
            Err(RegistrarError::Refused(m)) if m.starts_with("404") => {
                Err(RegistrarError::UnknownFarm(info.farm_id))
            }
            other => other?.ok_or_else(garbage),
        }
    }
    async fn report_uptime(
        &self,
        key: &KeyPair,
        twin: TwinId,
        node: NodeId,
        report: &UptimeReport,
    ) -> Result<(), RegistrarError> {
        self.write::<serde_json::Value>(
            key,
            Signer::Twin(twin),
            &format!("/nodes/{node}/uptime"),
            report,
        )
        .await?;
        Ok(())
    }
}
