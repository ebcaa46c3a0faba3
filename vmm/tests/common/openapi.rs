//! The control API's OpenAPI document (vmm/api/openapi.yaml) and a checker of JSON values
//! against its schemas: the subset of OpenAPI 3.0 schema keywords the document uses (`type`,
//! `enum`, `required`, `properties`, `additionalProperties: false`, `items`, `minimum`,
//! `maximum`, `oneOf`, `anyOf`, `$ref` to a component). A keyword it does not know is an
//! error, so a schema it cannot check never passes unchecked.

use std::path::Path;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

pub struct Doc {
    root: Yaml,
}

/// Keywords that only document.
const NOTES: &[&str] = &["description", "example"];

impl Doc {
    pub fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("api/openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        Self {
            root: serde_yaml::from_str(&text).unwrap(),
        }
    }

    pub fn from_str(text: &str) -> Self {
        Self {
            root: serde_yaml::from_str(text).unwrap(),
        }
    }

    pub fn root(&self) -> &Yaml {
        &self.root
    }

    /// Every documented route: (METHOD, path pattern, operation).
    pub fn operations(&self) -> Vec<(String, String, Yaml)> {
        let mut out = Vec::new();
        for (path, item) in self.root["paths"].as_mapping().expect("paths") {
            for (method, op) in item.as_mapping().expect("a path item") {
                out.push((
                    method.as_str().unwrap().to_uppercase(),
                    path.as_str().unwrap().to_string(),
                    op.clone(),
                ));
            }
        }
        out
    }

    fn operation(&self, method: &str, path: &str) -> &Yaml {
        let op = &self.root["paths"][path][method.to_lowercase().as_str()];
        assert!(!op.is_null(), "{method} {path} is not documented");
        op
    }

    /// The documented request example of an operation, as JSON text.
    pub fn request_example(&self, method: &str, path: &str) -> Option<String> {
        let example =
            &self.operation(method, path)["requestBody"]["content"]["application/json"]["example"];
        (!example.is_null()).then(|| serde_json::to_string(example).unwrap())
    }

    /// Checks the request example of every operation against its request schema.
    pub fn check_request_examples(&self) -> Result<usize, String> {
        let mut checked = 0;
        for (method, path, op) in self.operations() {
            let body = &op["requestBody"]["content"]["application/json"];
            if body.is_null() {
                continue;
            }
            let example: Json = serde_json::to_value(&body["example"]).unwrap();
            self.check(&body["schema"], &example)
                .map_err(|e| format!("{method} {path} request example: {e}"))?;
            checked += 1;
        }
        Ok(checked)
    }

    /// Checks a request body against the operation's request schema.
    pub fn check_request(&self, method: &str, path: &str, body: &str) -> Result<(), String> {
        let schema =
            &self.operation(method, path)["requestBody"]["content"]["application/json"]["schema"];
        if schema.is_null() {
            return Err(format!("{method} {path} documents no JSON request body"));
        }
        let value: Json = serde_json::from_str(body)
            .map_err(|e| format!("{method} {path} request: not JSON ({e}): {body}"))?;
        self.check(schema, &value)
            .map_err(|e| format!("{method} {path} request {body}: {e}"))
    }

    /// The documented status codes of an operation.
    pub fn statuses(&self, method: &str, path: &str) -> Vec<u16> {
        self.operation(method, path)["responses"]
            .as_mapping()
            .expect("responses")
            .keys()
            .map(|k| k.as_str().unwrap().parse().unwrap())
            .collect()
    }

    /// Checks an answer against the operation's documented response for `status`: the
    /// status is documented, the media type is the documented one (none: no body), and a JSON
    /// body matches its schema.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        content_type: Option<&str>,
        body: &str,
    ) -> Result<(), String> {
        let response = &self.operation(method, path)["responses"][status.to_string().as_str()];
        if response.is_null() {
            return Err(format!(
                "{method} {path}: status {status} is not documented ({body})"
            ));
        }
        let Some(content) = response["content"].as_mapping() else {
            return if body.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{method} {path} {status}: documented without a body, got {body}"
                ))
            };
        };
        let media = content_type
            .map(|t| t.split(';').next().unwrap_or("").trim())
            .ok_or_else(|| format!("{method} {path} {status}: no Content-Type"))?;
        let documented = &content
            .get(Yaml::String(media.to_string()))
            .ok_or_else(|| {
                format!("{method} {path} {status}: media type {media} not documented")
            })?["schema"];
        let value = if media == "application/json" {
            serde_json::from_str(body)
                .map_err(|e| format!("{method} {path} {status}: not JSON ({e}): {body}"))?
        } else {
            Json::String(body.to_string())
        };
        self.check(documented, &value)
            .map_err(|e| format!("{method} {path} {status}: {e}; body {body}"))
    }

    /// Checks `value` against `schema` (a schema of this document).
    pub fn check(&self, schema: &Yaml, value: &Json) -> Result<(), String> {
        self.check_at(schema, value, "$")
    }

    fn resolve<'a>(&'a self, schema: &'a Yaml) -> Result<&'a Yaml, String> {
        match schema["$ref"].as_str() {
            None => Ok(schema),
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/components/schemas/")
                    .ok_or_else(|| format!("unsupported $ref {reference}"))?;
                let target = &self.root["components"]["schemas"][name];
                if target.is_null() {
                    return Err(format!("$ref to a missing schema {reference}"));
                }
                Ok(target)
            }
        }
    }

    fn check_at(&self, schema: &Yaml, value: &Json, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        let keys = schema
            .as_mapping()
            .ok_or_else(|| format!("{at}: a schema must be a mapping"))?;
        for key in keys.keys() {
            let key = key.as_str().unwrap_or("");
            let known = [
                "$ref",
                "type",
                "enum",
                "required",
                "properties",
                "additionalProperties",
                "items",
                "minimum",
                "maximum",
                "oneOf",
                "anyOf",
            ];
            if !known.contains(&key) && !NOTES.contains(&key) {
                return Err(format!("{at}: schema keyword {key:?} is not checked"));
            }
        }
        if let Some(choices) = schema["oneOf"].as_sequence() {
            let matching = choices
                .iter()
                .filter(|choice| self.check_at(choice, value, at).is_ok())
                .count();
            if matching != 1 {
                return Err(format!(
                    "{at}: {value} matches {matching} of the oneOf schemas, not exactly one"
                ));
            }
        }
        if let Some(choices) = schema["anyOf"].as_sequence() {
            let errors: Vec<String> = choices
                .iter()
                .filter_map(|choice| self.check_at(choice, value, at).err())
                .collect();
            if errors.len() == choices.len() {
                return Err(format!(
                    "{at}: matches none of anyOf: {}",
                    errors.join("; ")
                ));
            }
        }
        if let Some(kind) = schema["type"].as_str() {
            let fits = match kind {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                other => return Err(format!("{at}: unknown type {other}")),
            };
            if !fits {
                return Err(format!("{at}: {value} is not of type {kind}"));
            }
        }
        if let Some(allowed) = schema["enum"].as_sequence() {
            let allowed: Vec<Json> = allowed
                .iter()
                .map(|v| serde_json::to_value(v).unwrap())
                .collect();
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let Some(number) = value.as_f64() {
            if let Some(min) = schema["minimum"].as_f64() {
                if number < min {
                    return Err(format!("{at}: {value} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema["maximum"].as_f64() {
                if number > max {
                    return Err(format!("{at}: {value} is above the maximum {max}"));
                }
            }
        }
        if let Some(object) = value.as_object() {
            if let Some(required) = schema["required"].as_sequence() {
                for name in required {
                    let name = name.as_str().unwrap();
                    if !object.contains_key(name) {
                        return Err(format!("{at}: required field {name:?} is missing"));
                    }
                }
            }
            let properties = schema["properties"].as_mapping();
            for (name, field) in object {
                let property = properties.and_then(|p| p.get(Yaml::String(name.clone())));
                match property {
                    Some(property) => self.check_at(property, field, &format!("{at}.{name}"))?,
                    None if schema["additionalProperties"] == Yaml::Bool(false) => {
                        return Err(format!("{at}: field {name:?} is not documented"))
                    }
                    None => {}
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (index, item) in array.iter().enumerate() {
                self.check_at(items, item, &format!("{at}[{index}]"))?;
            }
        }
        Ok(())
    }
}
