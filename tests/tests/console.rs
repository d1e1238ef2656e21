//! The operator's console in a real browser: headless Chromium driven through
//! ChromeDriver (scripts/ensure-chromium.sh installs both). A cluster runs
//! transactions; the pages are checked against what the CLI says: the
//! participant list (on the coordinator's own `--console-listen`), a
//! committed txid found by search, the activity totals, branches in doubt
//! while their coordinator is down and gone once it is back, a heuristic
//! decision taken from the page (reason, typed confirmation, the warning
//! shown) and compared with the coordinator's outcome, and a stuck branch
//! retried from the page. A screenshot of each page is kept in
//! `<target>/console-screenshots/` (or `$DECREE_ARTIFACTS`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::standin::{stand_in, Answer};
use common::webdriver::Driver;
use common::{decree_async, init, KillOnDrop};
use decree_client::{kv_payload, v1, KvOp, Outcome};
use decree_tests::{decree_binary, free_port, poll, Cluster, NodeId, Options};
use serde_json::json;
use tracing::info;

/// Where the screenshots go: `$DECREE_ARTIFACTS`, else next to the binaries.
fn artefacts() -> PathBuf {
    let dir = std::env::var_os("DECREE_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| decree_binary().parent().unwrap().parent().unwrap().join("console-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn cli(args: &[&str]) -> serde_json::Value {
    let run = decree_async(args.iter().map(|a| a.to_string()).collect()).await;
    assert_eq!(run.code, 0, "decree {args:?}: {}", run.stderr);
    run.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_what_the_cli_says_and_acts_for_the_operator() {
    init();
    let own_console = free_port().unwrap();
    let mut options = Options::new(3);
    options.coordinator_args =
        ["--prepare-timeout-ms", "1500", "--commit-timeout-ms", "500"].map(String::from).to_vec();
    options.coordinator_args.extend(["--console-listen".into(), format!("127.0.0.1:{own_console}")]);
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    let mut cluster = Cluster::start(options).await.unwrap();
    let url = cluster.coordinator_url();
    let shots = artefacts();

    info!("--- `decree console`, a process of its own (it outlives the coordinator)");
    let port = free_port().unwrap();
    let log = std::fs::File::create(cluster.dir().join("console.log")).unwrap();
    let _console = KillOnDrop(
        Command::new(decree_binary())
            .args(["console", "--coordinator", &url, "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let console = format!("http://127.0.0.1:{port}/");

    info!("--- transactions: committed ones and one aborted");
    let client = cluster.client().await.unwrap();
    let mut committed = Vec::new();
    for i in 0..20 {
        let ops = vec![
            KvOp::Put { key: format!("key-{i}"), value: b"v".to_vec() },
            KvOp::Add { key: "n".into(), delta: 1 },
        ];
        let result = client.transact(ops).await.unwrap();
        assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
        committed.push(result.txid);
    }
    let expect = KvOp::Expect { key: "n".into(), value: Some(b"0".to_vec()) };
    let aborted = client.transact(vec![expect]).await.unwrap();
    assert_eq!(aborted.outcome, Outcome::Aborted);

    let driver = Driver::start(&cluster.dir().join("chromedriver.log")).await;
    let browser = driver.browser().await;

    info!("--- the coordinator's own console: the participants, as `decree participants` lists them");
    browser.goto(&format!("http://127.0.0.1:{own_console}/#cluster")).await;
    let shown = browser
        .wait_for(
            "three participants",
            "const r = [...document.querySelectorAll('#participants tbody tr[data-name]')];
             return r.length === 3 ? r.map(x => [x.dataset.name, x.children[1].textContent, x.children[2].textContent]) : null;",
        )
        .await;
    let listed = cli(&["participants", "--coordinator", &url, "--json"]).await;
    let from_cli: Vec<serde_json::Value> =
        listed.as_array().unwrap().iter().map(|p| json!([p["name"], p["role"], p["state"]])).collect();
    assert_eq!(shown, serde_json::Value::Array(from_cli), "the page and the CLI list the same participants");
    browser.screenshot(&shots.join("cluster.png")).await;

    info!("--- activity: the totals count every decision");
    browser.goto(&format!("{console}#activity")).await;
    browser
        .wait_for(
            "21 decisions",
            "const c = document.querySelector('#total-committed'), a = document.querySelector('#total-aborted');
             return c && a && Number(c.textContent) >= 20 && Number(a.textContent) >= 1;",
        )
        .await;
    let lines = browser
        .script("return document.querySelectorAll('#chart-throughput polyline').length;", json!([]))
        .await;
    assert_eq!(lines, json!(2), "committed and aborted are drawn");
    browser.screenshot(&shots.join("activity.png")).await;

    info!("--- transactions: a committed txid found by search, as `decree status` says");
    let txid = committed[7].clone();
    browser.goto(&format!("{console}#transactions")).await;
    browser.type_into("#search-input", &txid).await;
    browser.click("#search-button").await;
    let found = browser
        .wait_for(
            "the search's answer",
            "const o = document.querySelector('#search-outcome');
             const row = document.querySelector('#recent tbody tr[data-txid]');
             return o && row ? [o.textContent, row.dataset.txid, row.children[1].textContent] : null;",
        )
        .await;
    assert!(found[0].as_str().unwrap().contains("committed"), "{found}");
    assert_eq!(found[1], json!(txid), "only the transaction searched for");
    assert_eq!(found[2], json!("committed"));
    let status = cli(&["status", &txid, "--coordinator", &url, "--json"]).await;
    assert_eq!(status["outcome"], "committed");
    browser.screenshot(&shots.join("transactions.png")).await;

    info!("--- in doubt: the coordinator dies with the decision durable, no Commit sent");
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let ops = names
        .iter()
        .map(|p| KvOp::Put { key: client.key_at(p, "doubt-").unwrap(), value: b"1".to_vec() })
        .collect();
    assert!(client.transact(ops).await.is_err(), "the coordinator died before answering");
    cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(20)).await.unwrap();

    browser.goto(&format!("{console}#in-doubt")).await;
    let shown = browser
        .wait_for(
            "three branches in doubt",
            "const r = [...document.querySelectorAll('#in-doubt tbody tr[data-txid]')];
             return r.length === 3 ? r.map(x => [x.dataset.participant, x.dataset.txid]) : null;",
        )
        .await;
    let urls: Vec<String> = (0..names.len()).map(|i| cluster.url_of(NodeId::Participant(i))).collect();
    let mut args = vec!["in-doubt".to_owned(), "--json".to_owned()];
    for u in &urls {
        args.extend(["--participant".to_owned(), u.clone()]);
    }
    let run = decree_async(args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let from_cli: BTreeSet<(String, String)> = run
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["participant"].as_str().unwrap().to_owned(), b["txid"].as_str().unwrap().to_owned()))
        .collect();
    let on_page: BTreeSet<(String, String)> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b[0].as_str().unwrap().to_owned(), b[1].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(on_page, from_cli, "the page and `decree in-doubt` show the same branches");
    let doubtful = on_page.iter().next().unwrap().1.clone();

    info!("--- a heuristic decision from the page: warned, a reason, the txid typed to confirm");
    browser.click("#in-doubt button.decide[data-participant='p1']").await;
    let warning =
        browser.script("return document.querySelector('#resolve-warning').textContent;", json!([])).await;
    assert!(warning.as_str().unwrap().contains("may contradict the coordinator"), "{warning}");
    browser.type_into("#resolve-reason", "coordinator host lost (drill)").await;
    browser.type_into("#resolve-operator", "console-test").await;
    browser.type_into("#resolve-confirm", "not-the-txid").await;
    let disabled =
        browser.script("return document.querySelector('#resolve-submit').disabled;", json!([])).await;
    assert_eq!(disabled, json!(true), "a wrong confirmation does not let the decision go");
    browser.script("document.querySelector('#resolve-confirm').value = '';", json!([])).await;
    browser.type_into("#resolve-confirm", &doubtful).await;
    browser.click("#resolve input[value='commit']").await;
    browser.screenshot(&shots.join("in-doubt.png")).await;
    browser.click("#resolve-submit").await;
    let result = browser
        .wait_for("the decision", "return document.querySelector('#resolve-result').textContent;")
        .await;
    assert!(result.as_str().unwrap().contains("committed at p1 by console-test (recorded)"), "{result}");
    let recorded = cli(&["heuristics", "--participant", &urls[0], "--json"]).await;
    assert_eq!(recorded[0]["txid"], json!(doubtful), "{recorded}");

    info!("--- the coordinator is back: it redrives, nothing is in doubt, the decision is compared");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    browser
        .wait_for(
            "nothing in doubt",
            "return document.querySelector('#in-doubt tbody tr.empty') !== null
                 && document.querySelector('#in-doubt tbody tr[data-txid]') === null;",
        )
        .await;
    let left =
        decree_async(vec!["in-doubt".into(), "--coordinator".into(), url.clone(), "--json".into()]).await;
    assert_eq!(left.json(), json!([]), "`decree in-doubt` agrees");
    browser.goto(&format!("{console}#stuck")).await;
    let heuristic = browser
        .wait_for(
            "the heuristic decision, compared",
            "const r = document.querySelector('#heuristics tbody tr[data-txid]');
             return r && r.children[5].textContent === 'committed' ? [r.dataset.txid, r.children[6].textContent] : null;",
        )
        .await;
    assert_eq!(heuristic, json!([doubtful, ""]), "the coordinator committed too: no contradiction");

    info!("--- a stuck branch, retried from the page");
    let standin = stand_in(&cluster, Answer::Refuse).await;
    let client = cluster.client().await.unwrap();
    let key = client.key_at("p1", "stuck-").unwrap();
    let branches = vec![
        v1::Branch {
            participant: "p1".into(),
            payload: kv_payload(vec![KvOp::Put { key, value: b"1".to_vec() }]),
        },
        v1::Branch { participant: "standin".into(), payload: Vec::new() },
    ];
    let stuck = client.transact_branches(branches).await.unwrap();
    assert_eq!(stuck.outcome, Outcome::Committed, "{}", stuck.reason);
    let row = format!("#stuck tbody tr[data-txid='{}']", stuck.txid);
    browser
        .wait_for("the stuck branch", &format!("return document.querySelector(\"{row}\") !== null;"))
        .await;
    let listed = cli(&["stuck", "--coordinator", &url, "--json"]).await;
    assert_eq!(listed[0]["txid"], json!(stuck.txid), "`decree stuck` lists it too");
    browser.screenshot(&shots.join("stuck.png")).await;
    standin.answer(Answer::Ack);
    browser.click(&format!("{row} button.retry")).await;
    let retried = browser
        .wait_for(
            "the retry's answer",
            "const r = document.querySelector('#retried'); return r && r.textContent;",
        )
        .await;
    assert!(retried.as_str().unwrap().contains("to standin"), "{retried}");
    browser
        .wait_for("the stuck branch gone", &format!("return document.querySelector(\"{row}\") === null;"))
        .await;
    poll(Duration::from_secs(10), "`decree stuck` to list nothing", || async {
        let run =
            decree_async(vec!["stuck".into(), "--coordinator".into(), url.clone(), "--json".into()]).await;
        (run.json() == json!([])).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(standin.commits(), 2, "refused once, delivered by the retry");

    info!("--- the lock tables, one per participant that answers");
    browser.goto(&format!("{console}#locks")).await;
    browser
        .wait_for("four lock tables", "return document.querySelectorAll('#locks table.locks').length === 4;")
        .await;
    browser.screenshot(&shots.join("locks.png")).await;
    browser.close().await;
    info!("screenshots in {}", shots.display());
}
