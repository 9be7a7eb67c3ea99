//! Every example in `docs/control-protocol.md` and `docs/guest-agent.md`
//! goes through the wire types and comes out as the same JSON, so the
//! documented protocol and the code cannot drift apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use balloon_protocol::agent::{parse_command, Command, FromAgent};
use balloon_protocol::control::{
    parse_request, RefreshStatsReply, Request, SetTargetReply, StatusReply, UnpinReply,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn doc(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The ```json blocks of a document, each parsed.
fn json_blocks(text: &str) -> Vec<Value> {
    text.split("```json\n")
        .skip(1)
        .map(|rest| {
            let block = rest.split("```").next().unwrap();
            serde_json::from_str(block).unwrap_or_else(|e| panic!("{e} in block:\n{block}"))
        })
        .collect()
}

/// The `{...}` examples in the first column of table rows, with the rest
/// of the row.
fn table_examples(text: &str) -> Vec<(Value, String)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("| `{")?;
            let (example, row) = rest.split_once("}` |")?;
            let value = serde_json::from_str(&format!("{{{example}}}")).ok()?;
            Some((value, row.trim().trim_end_matches('|').trim().to_string()))
        })
        .collect()
}

/// Parses `value` as `T` and checks it serialises back to the same JSON.
fn round_trip<T: Serialize + DeserializeOwned>(value: &Value) -> T {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"));
    assert_eq!(&serde_json::to_value(&typed).unwrap(), value);
    typed
}

#[test]
fn control_protocol_examples_round_trip() {
    let text = doc("control-protocol.md");
    let blocks = json_blocks(&text);
    let (mut requests, mut statuses, mut targets, mut refreshes, mut unpins) = (0, 0, 0, 0, 0);
    for block in &blocks {
        if block.get("cmd").is_some() {
            let request: Request = round_trip(block);
            assert_eq!(
                parse_request(block.to_string().as_bytes()).unwrap(),
                request
            );
            requests += 1;
        } else if block.get("connected").is_some() {
            round_trip::<StatusReply>(block);
            statuses += 1;
        } else if block.get("clamped").is_some() {
            round_trip::<SetTargetReply>(block);
            targets += 1;
        } else if block.get("stats").is_some() {
            round_trip::<RefreshStatsReply>(block);
            refreshes += 1;
        } else if block.get("was_pinned").is_some() {
            round_trip::<UnpinReply>(block);
            unpins += 1;
        } else {
            panic!("an example of no known kind: {block}");
        }
    }
    assert_eq!(
        (requests, statuses, targets, refreshes, unpins),
        (5, 1, 2, 1, 1)
    );

    // The error table: each request is refused with the documented text.
    let errors = table_examples(&text);
    assert_eq!(errors.len(), 5, "{errors:?}");
    for (request, documented) in errors {
        let documented = documented
            .trim_matches('`')
            .split(" …")
            .next()
            .unwrap()
            .to_string();
        match parse_request(request.to_string().as_bytes()) {
            Err(error) => assert!(
                error.starts_with(&documented),
                "{request}: {error:?} does not start with {documented:?}"
            ),
            // Range errors come from the backend, after parsing.
            Ok(Request::RefreshStats {
                timeout_ms: Some(ms),
            }) => assert!(ms > 60_000 && documented.contains("timeout_ms")),
            Ok(other) => panic!("{request} parsed as {other:?}"),
        }
    }
}

#[test]
fn guest_agent_examples_round_trip() {
    let text = doc("guest-agent.md");
    let blocks = json_blocks(&text);
    assert_eq!(blocks.len(), 1, "one report example");
    let report: FromAgent = round_trip(&blocks[0]);
    assert!(matches!(report, FromAgent::Report(_)));

    let commands = table_examples(&text);
    assert_eq!(commands.len(), 2, "{commands:?}");
    for (command, _) in commands {
        let typed: Command = round_trip(&command);
        assert_eq!(parse_command(command.to_string().as_bytes()), Ok(typed));
    }
}
