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
        "AWS::Events::EventBus" => "events",
        "AWS::SQS::Queue" => "sqs",
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
        shared::use_cases::refresh::LEASE,
        shared::budget::refresh_item()
    );
}

#[test]
fn a_connection_test_ends_inside_its_lease() {
    assert!(
        shared::budget::test_fits_its_lease(),
        "a test may hold the lease {:?}, longer than the lease {:?}:\n{}",
        shared::budget::test_under_its_lease().total(),
        shared::use_cases::refresh::LEASE,
        shared::budget::test_under_its_lease()
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

/// `sam build` runs `make build-<LogicalId>` for each function (BuildMethod: makefile): the
/// Makefile must have that target, and it must copy this function's binary.
#[test]
fn every_function_is_built_by_its_makefile_target() {
    let makefile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Makefile"))
        .expect("Makefile");
    for (id, binary, _) in functions() {
        let method = &resources()[id.as_str()]["Metadata"]["BuildMethod"];
        assert_eq!(method, "makefile", "{id}: BuildMethod");
        let target = format!("build-{id}:\n\tscripts/lambda-artifact.sh {binary}\n");
        assert!(
            makefile.contains(&target),
            "{id}: the Makefile needs\n{target}"
        );
    }
}

/// A fixed reserved concurrency takes capacity from the account's unreserved pool, which in
/// new accounts (a quota of 10) cannot go lower: the stack would fail to create.
#[test]
fn reserved_concurrency_is_unset_unless_asked_for() {
    for (id, _, function) in functions() {
        let reserved = &function["ReservedConcurrentExecutions"];
        if reserved.is_null() {
            continue;
        }
        let choice = tagged(reserved).expect("ReservedConcurrentExecutions is a !If");
        assert_eq!(choice.tag.to_string(), "!If", "{id}");
        let branches = list(&choice.value);
        let parameter = tagged(branches[1]).expect("!Ref parameter");
        let name = parameter.value.as_str().unwrap();
        assert_eq!(
            TEMPLATE["Parameters"][name]["Default"], "",
            "{id}: {name} must default to unset"
        );
        let otherwise = tagged(branches[2]).expect("!Ref AWS::NoValue");
        assert_eq!(otherwise.value, "AWS::NoValue", "{id}");
    }
}

/// Schedule names are unique per account and region: a fixed one makes the second stack
/// (staging beside prod) fail with "already exists".
#[test]
fn schedule_names_include_the_stack_name() {
    for (id, _, function) in functions() {
        let Some(events) = function["Events"].as_mapping() else {
            continue;
        };
        for (name, event) in events {
            if event["Type"] != "ScheduleV2" {
                continue;
            }
            let schedule_name = tagged(&event["Properties"]["Name"])
                .filter(|t| t.tag == "!Sub")
                .and_then(|t| t.value.as_str())
                .unwrap_or_default();
            assert!(
                schedule_name.contains("${AWS::StackName}"),
                "{id}.{name:?}: the schedule's Name must include the stack name"
            );
        }
    }
}

/// Data is kept when the stack is deleted or replaced, but a first create that rolls back
/// must not leave a table and a key behind on every attempt.
#[test]
fn table_and_key_are_retained_except_on_a_failed_create() {
    for (id, resource) in resources() {
        let kind = resource["Type"].as_str().unwrap();
        if kind == "AWS::DynamoDB::Table" || kind == "AWS::KMS::Key" {
            assert_eq!(resource["DeletionPolicy"], "RetainExceptOnCreate", "{id:?}");
            assert_eq!(resource["UpdateReplacePolicy"], "Retain", "{id:?}");
        }
    }
}

/// A failed or dropped refresh run, and an event Scheduler could not hand over, land in a
/// queue with an alarm on it; a throttled run is dropped rather than started hours late. A
/// stream batch the events function cannot handle is retried a bounded number of times, split
/// to isolate a bad record, and then lands in an alarmed queue too.
#[test]
fn failed_refresh_runs_land_in_alarmed_queues() {
    let queues: Vec<&str> = resources()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::SQS::Queue")
        .map(|(id, _)| id.as_str().unwrap())
        .collect();
    for queue in &queues {
        let alarmed = resources().values().any(|r| {
            r["Type"] == "AWS::CloudWatch::Alarm"
                && r["Properties"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
                && list(&r["Properties"]["Dimensions"])
                    .iter()
                    .any(|d| names_resource(&d["Value"]).as_deref() == Some(*queue))
        });
        assert!(alarmed, "{queue} has no alarm on its visible messages");
    }
    let mappings: Vec<(&Value, &Value)> = resources()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Lambda::EventSourceMapping")
        .map(|(id, r)| (id, &r["Properties"]))
        .collect();
    for (id, mapping) in &mappings {
        let destination = names_resource(&mapping["DestinationConfig"]["OnFailure"]["Destination"]);
        assert!(
            destination.is_some_and(|q| queues.contains(&q.as_str())),
            "{id:?}: failed stream batches need an on-failure queue of this stack"
        );
        assert_eq!(mapping["BisectBatchOnFunctionError"], true, "{id:?}");
        assert!(
            mapping["MaximumRetryAttempts"]
                .as_u64()
                .is_some_and(|n| (1..=100).contains(&n)),
            "{id:?}: a bounded number of retries (the default retries until the record expires)"
        );
    }
    for (id, _, function) in functions() {
        // HTTP functions are invoked by API Gateway, the events function by its stream
        // mapping (checked above).
        let Some(events) = function["Events"].as_mapping() else {
            continue;
        };
        let config = &function["EventInvokeConfig"];
        let destination = names_resource(&config["DestinationConfig"]["OnFailure"]["Destination"]);
        assert!(
            destination.is_some_and(|q| queues.contains(&q.as_str())),
            "{id}: failed runs need an on-failure queue of this stack"
        );
        let max_age = config["MaximumEventAgeInSeconds"]
            .as_u64()
            .unwrap_or(21_600);
        assert!(
            max_age <= 300,
            "{id}: a throttled run may start {max_age} s late"
        );
        for event in events.values() {
            let dead_letters = names_resource(&event["Properties"]["DeadLetterConfig"]["Arn"]);
            assert!(
                dead_letters.is_some_and(|q| queues.contains(&q.as_str())),
                "{id}: scheduled events need a dead-letter queue of this stack"
            );
        }
    }
}

/// The functions' own log filter (info; the AWS SDK at warn) applies, and API Gateway's
/// access log says why an integration failed.
#[test]
fn logs_keep_the_codes_filter_and_integration_errors() {
    let variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap();
    assert!(!variables.contains_key("RUST_LOG"));
    for (_, _, function) in functions() {
        assert!(function["Environment"]["Variables"]["RUST_LOG"].is_null());
    }
    let format = resources()["HttpApiStage"]["Properties"]["AccessLogSettings"]["Format"]
        .as_str()
        .unwrap();
    assert!(
        format.contains("$context.integrationErrorMessage"),
        "{format}"
    );
    serde_json::from_str::<serde_json::Value>(format).expect("the access log format is JSON");
}

/// `invalid_client` (a wrong or placeholder client secret) pages from every function that
/// authenticates to Klaviyo as the client.
#[test]
fn a_rejected_client_secret_raises_an_alarm() {
    for (id, _, function) in functions() {
        let secrets: Vec<Option<String>> = statements(function)
            .into_iter()
            .flat_map(|s| list(&s["Resource"]))
            .map(names_resource)
            .collect();
        if !secrets.contains(&Some("KlaviyoClientSecret".to_owned())) {
            continue;
        }
        let log_group = names_resource(&function["LoggingConfig"]["LogGroup"]).unwrap();
        let filtered = resources().values().any(|r| {
            r["Type"] == "AWS::Logs::MetricFilter"
                && names_resource(&r["Properties"]["LogGroupName"]).as_deref()
                    == Some(log_group.as_str())
                && r["Properties"]["FilterPattern"]
                    .as_str()
                    .is_some_and(|p| p.contains("\"klaviyo_client_rejected\""))
                && r["Properties"]["MetricTransformations"][0]["MetricName"]
                    == "KlaviyoClientRejected"
        });
        assert!(
            filtered,
            "{id}: no KlaviyoClientRejected metric filter on {log_group}"
        );
    }
    let alarmed = resources().values().any(|r| {
        r["Type"] == "AWS::CloudWatch::Alarm"
            && r["Properties"]["MetricName"] == "KlaviyoClientRejected"
    });
    assert!(alarmed, "no alarm on KlaviyoClientRejected");
}

/// Paths no route names reach a function (which answers 404 in the one error shape, with
/// CORS), on AWS and locally alike.
#[test]
fn unknown_paths_reach_a_function() {
    let default = resources()
        .values()
        .find(|r| {
            r["Type"] == "AWS::ApiGatewayV2::Route" && r["Properties"]["RouteKey"] == "$default"
        })
        .expect("a $default route");
    let integration = tagged(&default["Properties"]["Target"])
        .and_then(|t| t.value.as_str())
        .and_then(|t| t.strip_prefix("integrations/${"))
        .and_then(|t| t.strip_suffix('}'))
        .expect("Target: !Sub integrations/${…}");
    let function =
        names_resource(&resources()[integration]["Properties"]["IntegrationUri"]).unwrap();
    let binary = functions()
        .into_iter()
        .find(|(id, _, _)| *id == function)
        .map(|(_, binary, _)| binary)
        .unwrap();
    let cargo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .expect("Cargo.toml");
    let local = format!("\"/{{*path}}\" = \"{binary}\"");
    assert!(cargo.contains(&local), "the local router needs {local}");
}

/// What a parameter accepts as CloudFormation checks it: pattern, length, allowed values.
struct Accepts<'a> {
    parameter: &'a Value,
    pattern: Option<regex::Regex>,
}

impl<'a> Accepts<'a> {
    fn new(parameter: &'a Value) -> Self {
        // CloudFormation matches the whole value; the patterns anchor themselves too.
        let pattern = parameter["AllowedPattern"]
            .as_str()
            .map(|p| regex::Regex::new(&format!("^(?:{p})$")).expect("pattern compiles"));
        Self { parameter, pattern }
    }

    fn value(&self, value: &str) -> bool {
        let parameter = self.parameter;
        if self.pattern.as_ref().is_some_and(|p| !p.is_match(value)) {
            return false;
        }
        if let Some(min) = parameter["MinLength"].as_u64()
            && (value.chars().count() as u64) < min
        {
            return false;
        }
        if let Some(allowed) = parameter["AllowedValues"].as_sequence() {
            return allowed.iter().any(|a| {
                a.as_str() == Some(value) || a.as_u64().is_some_and(|n| n.to_string() == value)
            });
        }
        parameter["Type"] == "String"
    }
}

/// Every parameter that becomes a setting (through Globals) accepts only values the
/// functions' configuration parser accepts, so a deploy fails where start-up would have;
/// for whole numbers exactly the same ones. (Elsewhere a pattern may be stricter: https only,
/// no stray whitespace, since plain http is only for loopback and a deployed stack has none.)
#[test]
fn parameters_accept_only_what_the_functions_accept() {
    let variables = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap();
    let samples: Vec<String> = [
        "",
        " ",
        "x",
        "abc",
        "a b",
        "pk_abc123",
        "client-id_1",
        "https://app.example.com",
        "https://app.example.com/",
        "https://app.example.com/base/path",
        "https://APP.example.com",
        "https://app.example.com:8443",
        "https://app.example.com:443",
        "https://app.example.com:99999",
        "https://app.example.com:0",
        "https://app.example.com?x=1",
        "https://app.example.com#f",
        "https://user:pw@app.example.com",
        "http://app.example.com",
        "http://127.0.0.1:9300",
        "https://-bad-.example.com",
        "https://a..b",
        "https://app.example.com/a b",
        "https://",
        "ftp://app.example.com",
        "*",
        "null",
        "https://a.example.com,https://b.example.com",
        "https://a.example.com, https://b.example.com",
        "https://a.example.com,",
        "https://a.example.com/x",
        "https://a.example.com:8443,https://b.example.com",
        "accounts:read",
        "accounts:read lists:read",
        "accounts:read  lists:read",
        "accounts:read,lists:read",
        "Accounts:read",
        "2025-10-15",
        "2026-01-15.pre",
        "2025-10-15.",
        "2025-1-15",
        "october",
        "2025-10-15.Pre",
        "01",
        "1.5",
        "1e2",
        "-1",
        "+5",
        " 5",
        "5 ",
        "0x10",
        "１",
        "https://foo.1",
        "https://999.1.1.1",
        "https://xn--zz.com",
        "https://010.0.0.1",
        "https://0x7f.1",
        "https://1.2.3",
        "https://app.example.com/a%zz",
        "https://app.example.com/p;x=1",
        "https://a-b.example.co.uk/x/",
        "client\u{a0}id",
        "client\u{1}id",
        "client\tid",
        "required",
        "off",
        "Required",
        "OFF",
        "usage-aware",
        "eager",
        "Eager",
        "24h",
        "1h",
        "2h",
        "720h",
        "721h",
        "0h",
        "2d",
        "30d",
        "31d",
        "90m",
        "86400s",
        "1.5h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every number to 300, every boundary of the ranges in use, and a spread up to 100,000.
    let mut numbers: Vec<u32> = (0..=300).chain((300..=100_000).step_by(997)).collect();
    for edge in [
        999, 1_000, 9_999, 10_000, 79_999, 80_000, 85_999, 86_000, 86_400, 99_999,
    ] {
        numbers.extend([edge - 1, edge, edge + 1]);
    }
    let numbers: Vec<String> = numbers.iter().map(u32::to_string).collect();

    let base = |name: &str| -> Option<String> {
        Some(match name {
            "TABLE_NAME" => "klaviyo-connect".into(),
            "KMS_KEY_ID" => "arn:aws:kms:us-east-1:123456789012:key/abc".into(),
            "KLAVIYO_CLIENT_ID" => "client-id".into(),
            "KLAVIYO_CLIENT_SECRET_ARN" => "arn:aws:secretsmanager:us-east-1:1:secret:k".into(),
            "KLAVIYO_REDIRECT_URI" => "https://api.example.com/klaviyo/oauthcallback".into(),
            "JWT_SECRET_ARN" => "arn:aws:secretsmanager:us-east-1:1:secret:j".into(),
            "FRONTEND_URL" => "https://app.example.com".into(),
            _ => return None,
        })
    };
    let mut checked = 0;
    for (variable, source) in variables {
        let variable = variable.as_str().unwrap();
        // `!Ref Param`, or `!If [Cond, !Ref Param, !Ref AWS::NoValue]` for optional ones.
        let reference = match tagged(source) {
            Some(t) if t.tag == "!Ref" => t.value.as_str(),
            Some(t) if t.tag == "!If" => tagged(list(&t.value)[1]).and_then(|r| r.value.as_str()),
            _ => None,
        };
        let Some(parameter) = reference.and_then(|name| TEMPLATE["Parameters"].get(name)) else {
            continue;
        };
        checked += 1;
        let accepts = Accepts::new(parameter);
        let parses = |value: &str| {
            shared::adapters::config::Config::from_lookup(|name| {
                if name == variable {
                    Some(value.to_owned())
                } else {
                    base(name)
                }
            })
        };
        // Whole-number parameters: their patterns are made of digits and alternatives only.
        let numeric = parameter["AllowedPattern"]
            .as_str()
            .is_some_and(|p| p.chars().all(|c| "^$()[]{}|,?-0123456789".contains(c)));
        let mut both = 0;
        for value in samples.iter().chain(&numbers) {
            let template = accepts.value(value);
            let parsed = if template || numeric {
                parses(value)
            } else {
                continue;
            };
            if template {
                let config = parsed.unwrap_or_else(|e| {
                    panic!("{variable}: the template accepts {value:?} but the functions refuse it: {e}")
                });
                if variable == "FRONTEND_URL" {
                    // Accepted as typed: no host rewritten (010.0.0.1 would become 8.0.0.1).
                    let typed = value.trim_start_matches("https://");
                    let typed = typed.split([':', '/']).next().unwrap().to_ascii_lowercase();
                    assert_eq!(
                        config.frontend_url.host_str(),
                        Some(typed.as_str()),
                        "{value}"
                    );
                }
                both += 1;
            } else if numeric && numbers.contains(value) {
                assert!(
                    parsed.is_err(),
                    "{variable}: the functions accept {value} but the template refuses it"
                );
            }
        }
        assert!(
            both > 0,
            "{variable}: the template accepts none of the samples"
        );
        let default = parameter["Default"].as_str().unwrap_or_default();
        assert!(
            default.is_empty() || accepts.value(default),
            "{variable}: the default {default:?} fails its own pattern"
        );
    }
    assert!(
        checked >= 10,
        "only {checked} settings come from parameters"
    );
}

/// With a `WebhookUrl`, EventBridge itself delivers every connection event there: an API
/// destination whose connection takes its header value from a generated secret (never a
/// literal in the template), retries for a day, then an alarmed dead-letter queue only that
/// rule may write to. Without one, none of it exists.
#[test]
fn webhooks_are_delivered_by_eventbridge_with_a_secret_header_retries_and_a_dead_letter_queue() {
    let webhook_resources: Vec<&str> = resources()
        .iter()
        .filter(|(id, _)| id.as_str().unwrap().starts_with("Webhook"))
        .map(|(id, _)| id.as_str().unwrap())
        .collect();
    assert!(webhook_resources.len() >= 7, "{webhook_resources:?}");
    for id in &webhook_resources {
        assert_eq!(
            resources()[*id]["Condition"],
            "HasWebhook",
            "{id} exists only with a WebhookUrl"
        );
    }
    let connection = &resources()["WebhookConnection"]["Properties"];
    let value = tagged(&connection["AuthParameters"]["ApiKeyAuthParameters"]["ApiKeyValue"])
        .expect("the header value is resolved, not written in the template");
    assert!(
        value
            .value
            .as_str()
            .unwrap()
            .starts_with("{{resolve:secretsmanager:${WebhookSecret}"),
        "{value:?}"
    );
    let rule = &resources()["WebhookRule"]["Properties"];
    assert_eq!(
        names_resource(&rule["EventBusName"]).as_deref(),
        Some("ConnectionEventsBus")
    );
    let target = &list(&rule["Targets"])[0];
    assert_eq!(
        names_resource(&target["Arn"]).as_deref(),
        Some("WebhookDestination")
    );
    assert_eq!(
        names_resource(&target["DeadLetterConfig"]["Arn"]).as_deref(),
        Some("WebhookDeadLetterQueue")
    );
    assert_eq!(target["RetryPolicy"]["MaximumEventAgeInSeconds"], 86_400);
    let policy = &resources()["WebhookDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"];
    let statement = &list(&policy["Statement"])[0];
    assert_eq!(
        names_resource(&statement["Condition"]["ArnEquals"]["aws:SourceArn"]).as_deref(),
        Some("WebhookRule"),
        "only the webhook rule may write dead letters"
    );
    let parameter = &TEMPLATE["Parameters"]["WebhookUrl"];
    let pattern = regex::Regex::new(parameter["AllowedPattern"].as_str().unwrap()).unwrap();
    for (url, ok) in [
        ("", true),
        ("https://app.example.com/hooks/klaviyo", true),
        ("http://app.example.com/hooks", false),
        ("https://app.example.com/a b", false),
        ("https://app.example.com/hooks/{user}", false),
        ("https://app.example.com/hooks/*", false),
        ("https://app.example.com/#fragment", false),
    ] {
        assert_eq!(pattern.is_match(url), ok, "{url}");
    }
}

/// The token function is for the host app's services, invoked with IAM: nothing routes HTTP to
/// it or lets another service invoke it, and the managed policy host services attach grants
/// exactly that invocation; its ARN and the policy's are outputs.
#[test]
fn the_token_function_is_invoked_with_iam_only() {
    for (id, resource) in resources() {
        let properties = &resource["Properties"];
        let target = match resource["Type"].as_str().unwrap() {
            "AWS::ApiGatewayV2::Integration" => &properties["IntegrationUri"],
            "AWS::Lambda::Permission" => &properties["FunctionName"],
            _ => continue,
        };
        assert_ne!(
            names_resource(target).as_deref(),
            Some("TokenFunction"),
            "{id:?} exposes the token function"
        );
    }
    assert!(resources()["TokenFunction"]["Properties"]["Events"].is_null());
    let policy = &resources()["TokenInvokePolicy"];
    assert_eq!(policy["Type"], "AWS::IAM::ManagedPolicy");
    let statements = list(&policy["Properties"]["PolicyDocument"]["Statement"]);
    assert_eq!(statements.len(), 1);
    assert_eq!(statements[0]["Effect"], "Allow");
    assert_eq!(statements[0]["Action"], "lambda:InvokeFunction");
    assert_eq!(
        names_resource(&statements[0]["Resource"]).as_deref(),
        Some("TokenFunction")
    );
    let outputs = &TEMPLATE["Outputs"];
    assert_eq!(
        names_resource(&outputs["TokenFunctionArn"]["Value"]).as_deref(),
        Some("TokenFunction")
    );
    assert_eq!(
        names_resource(&outputs["TokenInvokePolicyArn"]["Value"]).as_deref(),
        Some("TokenInvokePolicy")
    );
}

/// Every function's errors (crashes, timeouts, failed runs) page someone.
#[test]
fn every_function_has_an_errors_alarm() {
    for (id, _, _) in functions() {
        let alarmed = resources().values().any(|r| {
            r["Type"] == "AWS::CloudWatch::Alarm"
                && r["Properties"]["Namespace"] == "AWS/Lambda"
                && r["Properties"]["MetricName"] == "Errors"
                && list(&r["Properties"]["Dimensions"])
                    .iter()
                    .any(|d| names_resource(&d["Value"]).as_deref() == Some(id.as_str()))
        });
        assert!(alarmed, "{id} has no alarm on its Errors metric");
    }
}

/// The deploy guide and the runbook cannot fall behind the template: every parameter is in
/// docs/DEPLOY.md's table, every output and every function setting is named there, and every
/// alarm and dead-letter queue has its entry in docs/OPERATIONS.md.
#[test]
fn the_docs_name_every_parameter_output_setting_alarm_and_queue() {
    let doc = |name: &str| {
        std::fs::read_to_string(format!("{}/../docs/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
    };
    let (deploy, operations) = (doc("DEPLOY.md"), doc("OPERATIONS.md"));
    let mut missing = Vec::new();
    let names = |section: &str| -> Vec<String> {
        TEMPLATE[section]
            .as_mapping()
            .unwrap_or_else(|| panic!("{section}"))
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    for parameter in names("Parameters") {
        if !deploy.contains(&format!("| `{parameter}` |")) {
            missing.push(format!("DEPLOY.md: the parameter {parameter}"));
        }
    }
    for output in names("Outputs") {
        if !deploy.contains(&format!("`{output}`")) {
            missing.push(format!("DEPLOY.md: the output {output}"));
        }
    }
    let settings = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_owned());
    for setting in settings {
        if !deploy.contains(&format!("`{setting}`")) {
            missing.push(format!("DEPLOY.md: the setting {setting}"));
        }
    }
    for (id, resource) in resources() {
        let id = id.as_str().unwrap();
        let entry = match resource["Type"].as_str() {
            Some("AWS::CloudWatch::Alarm") => format!("`{id}`"),
            Some("AWS::SQS::Queue") => format!("### {id}"),
            _ => continue,
        };
        if !operations.contains(&entry) {
            missing.push(format!("OPERATIONS.md: {entry}"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}
