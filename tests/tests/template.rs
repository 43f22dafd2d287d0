//! Static checks of template.yaml: what the local stack cannot show. moto enforces each
//! function's actions (scripts/moto_iam_server.py, and scripts/iam_audit.py after the run shows
//! every granted action was used); these check the rest of what AWS will enforce: statements
//! scoped to this stack's resources, the KMS key policy, and each function's worst-case time
//! against its Lambda timeout.

use serde_yaml_ng::Value;
use serde_yaml_ng::value::TaggedValue;
use std::sync::LazyLock;
use std::time::Duration;

static TEMPLATE: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("template.yaml"))
        .expect("template.yaml parses")
});

fn resources() -> &'static serde_yaml_ng::Mapping {
    TEMPLATE["Resources"].as_mapping().expect("Resources")
}

/// (logical id, binary, properties) of every function.
fn functions() -> Vec<(String, String, &'static Value)> {
    resources()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Serverless::Function")
        .map(|(id, r)| {
            let binary = r["Metadata"]["BuildProperties"]["Binary"]
                .as_str()
                .expect("Metadata.BuildProperties.Binary")
                .to_owned();
            (id.as_str().unwrap().to_owned(), binary, &r["Properties"])
        })
        .collect()
}

fn list(value: &Value) -> Vec<&Value> {
    match value {
        Value::Sequence(items) => items.iter().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

fn statements(function: &Value) -> Vec<&Value> {
    list(&function["Policies"])
        .into_iter()
        .flat_map(|policy| list(&policy["Statement"]))
        .collect()
}

fn actions(statement: &Value) -> Vec<String> {
    list(&statement["Action"])
        .into_iter()
        .map(|a| a.as_str().expect("action is a string").to_owned())
        .collect()
}

fn tagged(value: &Value) -> Option<&TaggedValue> {
    match value {
        Value::Tagged(tagged) => Some(tagged),
        _ => None,
    }
}

/// The logical ids of this template's resources that `value` (`!GetAtt X.Arn`, `!Ref X`,
/// `!Sub ${X.Arn}/…`) names.
fn names_resource(value: &Value) -> Option<String> {
    let tagged = tagged(value)?;
    let text = tagged.value.as_str()?;
    let name = match tagged.tag.to_string().as_str() {
        "!GetAtt" => text.split('.').next()?.to_owned(),
        "!Ref" => text.to_owned(),
        "!Sub" => text
            .strip_prefix("${")?
            .split(['.', '}'])
            .next()?
            .to_owned(),
        _ => return None,
    };
    resources().contains_key(name.as_str()).then_some(name)
}

#[test]
fn every_statement_names_this_stacks_resources() {
    for (id, _, function) in functions() {
        let statements = statements(function);
        assert!(!statements.is_empty(), "{id} has no policy statements");
        for statement in statements {
            assert_eq!(statement["Effect"], "Allow", "{id}: {statement:?}");
            for action in actions(statement) {
                assert!(!action.contains('*'), "{id}: wildcard action {action}");
            }
            for resource in list(&statement["Resource"]) {
                assert!(
                    names_resource(resource).is_some(),
                    "{id}: resource {resource:?} is not one of this stack's resources (no `*`)"
                );
            }
        }
    }
}

#[test]
fn function_actions_match_the_service_of_their_resource() {
    let service_of = |resource: &str| match resources()[resource]["Type"].as_str().unwrap() {
        "AWS::DynamoDB::Table" => "dynamodb",
        "AWS::KMS::Key" => "kms",
        "AWS::SecretsManager::Secret" => "secretsmanager",
        other => panic!("unexpected resource type {other}"),
    };
    for (id, _, function) in functions() {
        for statement in statements(function) {
            for resource in list(&statement["Resource"]) {
                let service = service_of(&names_resource(resource).unwrap());
                for action in actions(statement) {
                    assert!(
                        action.starts_with(&format!("{service}:")),
                        "{id}: {action} on a {service} resource"
                    );
                }
            }
        }
    }
}

const USE_ACTIONS: [&str; 9] = [
    "kms:CreateGrant",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
];

/// Whether an action pattern (`kms:*`, `kms:Re*`, `kms:Decrypt`) covers `action`.
fn covers(pattern: &str, action: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => action.to_lowercase().starts_with(&prefix.to_lowercase()),
        None => pattern.eq_ignore_ascii_case(action),
    }
}

fn requires_service_context(statement: &Value, who: &str) {
    let equals = &statement["Condition"]["StringEquals"];
    assert_eq!(
        equals["kms:EncryptionContext:service"], "klaviyo-connect",
        "{who}: use of the key must require the service's encryption context"
    );
    let purposes: Vec<&str> = list(&equals["kms:EncryptionContext:purpose"])
        .into_iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !purposes.is_empty()
            && purposes
                .iter()
                .all(|p| ["oauth_tokens", "api_key"].contains(p)),
        "{who}: use of the key must name this service's purposes, got {purposes:?}"
    );
}

#[test]
fn key_policy_lets_administrators_manage_but_not_use_the_key() {
    let keys: Vec<&Value> = resources()
        .values()
        .filter(|r| r["Type"] == "AWS::KMS::Key")
        .collect();
    assert_eq!(keys.len(), 1);
    let policy = &keys[0]["Properties"]["KeyPolicy"];
    let mut use_statements = 0;
    for statement in list(&policy["Statement"]) {
        let sid = statement["Sid"].as_str().unwrap_or("?");
        let patterns = actions(statement);
        let grants_use = USE_ACTIONS
            .iter()
            .any(|action| patterns.iter().any(|p| covers(p, action)));
        if !grants_use {
            continue;
        }
        use_statements += 1;
        for pattern in &patterns {
            assert!(
                ["kms:Decrypt", "kms:GenerateDataKey"].contains(&pattern.as_str()),
                "{sid}: a statement that allows use may allow only Decrypt and GenerateDataKey, not {pattern}"
            );
        }
        let principal = &statement["Condition"]["ArnLike"]["aws:PrincipalArn"];
        let role_pattern = tagged(principal)
            .and_then(|t| t.value.as_str())
            .unwrap_or_default();
        assert!(
            role_pattern.ends_with(":role/klaviyo-connect/${AWS::StackName}/*"),
            "{sid}: use must be limited to this stack's function roles, got {principal:?}"
        );
        requires_service_context(statement, sid);
    }
    assert_eq!(
        use_statements, 1,
        "exactly one key-policy statement allows use"
    );
}

#[test]
fn function_roles_live_under_the_path_the_key_policy_names() {
    for (id, _, function) in functions() {
        let path = tagged(&function["RolePath"]).and_then(|t| t.value.as_str());
        assert_eq!(
            path,
            Some("/klaviyo-connect/${AWS::StackName}/"),
            "{id}: RolePath"
        );
    }
}

#[test]
fn function_policies_use_the_key_only_with_the_service_context() {
    for (id, _, function) in functions() {
        for statement in statements(function) {
            if actions(statement).iter().any(|a| a.starts_with("kms:")) {
                requires_service_context(statement, &id);
            }
        }
    }
}

// ---- time budgets ---------------------------------------------------------------------

fn timeout_of(function: &Value) -> Duration {
    let seconds = function["Timeout"]
        .as_u64()
        .or_else(|| TEMPLATE["Globals"]["Function"]["Timeout"].as_u64())
        .expect("a Timeout");
    Duration::from_secs(seconds)
}

#[test]
fn every_functions_worst_case_fits_its_timeout() {
    for (id, binary, function) in functions() {
        let timeout = timeout_of(function);
        let budget = shared::budget::worst_case(&binary, timeout)
            .unwrap_or_else(|| panic!("{id}: no time budget for `{binary}` in shared::budget"));
        // Margin: a tenth of the timeout, at least two seconds (cold start, scheduling).
        let margin = (timeout / 10).max(Duration::from_secs(2));
        assert!(
            budget.total() + margin <= timeout,
            "{id}: worst case {:?} (+{margin:?} margin) does not fit its {timeout:?} timeout:\n{budget}",
            budget.total()
        );
        println!(
            "{id}: worst case {:?} of {timeout:?}\n{budget}",
            budget.total()
        );
    }
}

#[test]
fn a_refresh_ends_inside_its_lease() {
    assert!(
        shared::budget::refresh_fits_its_lease(),
        "one refresh may take {:?}, longer than its lease {:?}:\n{}",
        shared::budget::refresh_item().total(),
        shared::refresh::LEASE,
        shared::budget::refresh_item()
    );
}

/// Locally each function runs as its own IAM user: `cargo lambda watch` must give it its
/// profile, or it runs as the user with no rights at all.
#[test]
fn every_function_has_its_local_aws_profile() {
    let cargo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .expect("Cargo.toml");
    for (id, binary, _) in functions() {
        let entry =
            format!("[workspace.metadata.lambda.bin.{binary}.env]\nAWS_PROFILE = \"{binary}\"");
        assert!(
            cargo.contains(&entry),
            "{id}: Cargo.toml needs\n{entry}\nso that `cargo lambda watch` runs it as its IAM user"
        );
    }
}
