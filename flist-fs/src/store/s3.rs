//! `s3://` store: path-style object access (`PUT`/`GET`/`HEAD /<bucket>/<prefix><hex id>`)
//! signed with AWS Signature V4 (hmac-sha256 over ureq); ranged GETs with a `Range` header.
//! Works with Garage, MinIO and AWS.

use super::{EnvCredentials, Store};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct S3Store {
    endpoint: String,
    host: String,
    bucket: String,
    prefix: String,
    region: String,
    access: String,
    secret: String,
    url: String,
    agent: ureq::Agent,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

/// (YYYYMMDD, YYYYMMDDTHHMMSSZ) for `t`, UTC.
fn amz_dates(t: SystemTime) -> (String, String) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    let full = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (date, full)
}

impl S3Store {
    /// Opens `url`, a URL the user typed (credentials may come from the environment).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, EnvCredentials::Use)
    }

    /// Opens `url`; `env` says whether credentials missing from it may come from
    /// `FLIST_S3_ACCESS_KEY`/`AWS_ACCESS_KEY_ID` and `FLIST_S3_SECRET_KEY`/`AWS_SECRET_ACCESS_KEY`.
    pub fn open_with(url: &str, env_creds: EnvCredentials) -> Result<Self> {
        let shown = super::redact_url(url);
        let bad = |reason: &str| Error::BadStoreUrl {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let u = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let host = u.host_str().ok_or_else(|| bad("missing host"))?.to_string();
        let mut segs = u.path().trim_matches('/').splitn(2, '/');
        let bucket = segs
            .next()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("missing bucket"))?;
        let prefix = segs
            .next()
            .map(|p| format!("{}/", p.trim_end_matches('/')))
            .unwrap_or_default();
        let query = |k: &str| {
            u.query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let tls = matches!(query("tls").as_deref(), Some("true" | "1"));
        let region = query("region").unwrap_or_else(|| "us-east-1".into());
        let env = |names: &[&str]| names.iter().find_map(|n| env_creds.var(n));
        let access = if u.username().is_empty() {
            env(&["FLIST_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
        } else {
            Some(u.username().to_string())
        }
        .ok_or_else(|| {
            bad("no access key (in the URL or FLIST_S3_ACCESS_KEY / AWS_ACCESS_KEY_ID)")
        })?;
        let secret = u
            .password()
            .map(str::to_string)
            .or_else(|| env(&["FLIST_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"]))
            .ok_or_else(|| {
                bad("no secret key (in the URL or FLIST_S3_SECRET_KEY / AWS_SECRET_ACCESS_KEY)")
            })?;
        let host_header = match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Ok(S3Store {
            endpoint: format!("{}://{host_header}", if tls { "https" } else { "http" }),
            host: host_header,
            bucket: bucket.to_string(),
            prefix,
            region,
            access,
            secret,
            url: shown,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout_read(Duration::from_secs(30))
                .timeout(Duration::from_secs(60))
                .redirects(0)
                .max_idle_connections_per_host(16)
                .build(),
        })
    }

    fn signed(&self, method: &str, id: &ChunkId, payload: &[u8]) -> ureq::Request {
        let path = format!("/{}/{}{}", self.bucket, self.prefix, id.to_hex());
        let (date, stamp) = amz_dates(SystemTime::now());
        let payload_hash = hex(&Sha256::digest(payload));
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical = format!(
            "{method}\n{path}\n\nhost:{}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{stamp}\n\n{signed_headers}\n{payload_hash}",
            self.host
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            hex(&Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access
        );
        self.agent
            .request(method, &format!("{}{path}", self.endpoint))
            .set("x-amz-date", &stamp)
            .set("x-amz-content-sha256", &payload_hash)
            .set("authorization", &auth)
    }

    fn fail(&self, what: &str, id: &ChunkId, e: ureq::Error) -> Error {
        match e {
            ureq::Error::Status(code, resp) => {
                let body = resp.into_string().unwrap_or_default();
                let body: String = body.chars().take(300).collect();
                Error::store(&self.url, format!("{what} chunk {id}: HTTP {code}: {body}"))
            }
            other => Error::store(&self.url, format!("{what} chunk {id}: {other}")),
        }
    }
}

impl Store for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        match self.signed("GET", id, b"").call() {
            Ok(resp) => super::http::read_body(&self.url, id, resp),
            Err(ureq::Error::Status(404, _)) => Err(Error::ChunkNotFound {
                id: id.to_hex(),
                store: self.url.clone(),
            }),
            Err(e) => Err(self.fail("GET", id, e)),
        }
    }

    fn get_range(&self, id: &ChunkId, offset: u64, len: u32) -> Result<Vec<u8>> {
        // `range` is not among the signed headers (SigV4 allows unsigned ones).
        let req = self
            .signed("GET", id, b"")
            .set("range", &super::http::range_header(offset, len));
        match req.call() {
            Ok(resp) => super::http::read_range_body(&self.url, id, resp, offset, len),
            Err(ureq::Error::Status(404, _)) => Err(Error::ChunkNotFound {
                id: id.to_hex(),
                store: self.url.clone(),
            }),
            Err(e) => Err(self.fail("GET", id, e)),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<()> {
        match self.signed("PUT", id, data).send_bytes(data) {
            Ok(resp) if resp.status() >= 300 => {
                Err(super::http::redirect_error(&self.url, id, &resp))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail("PUT", id, e)),
        }
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        match self.signed("HEAD", id, b"").call() {
            Ok(resp) if resp.status() >= 300 => {
                Err(super::http::redirect_error(&self.url, id, &resp))
            }
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(e) => Err(self.fail("HEAD", id, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(amz_dates(t), ("20231114".into(), "20231114T221320Z".into()));
    }

    #[test]
    fn url_parsing() {
        let s = S3Store::open("s3://ak:sk@127.0.0.1:3900/bkt/pre?region=garage").unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_str(), s.region.as_str()),
            ("bkt", "pre/", "garage")
        );
        assert_eq!(s.url(), "s3://127.0.0.1:3900/bkt/pre?region=garage");
        assert!(S3Store::open("s3://ak:sk@host").is_err());
    }
}
