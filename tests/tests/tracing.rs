//! Spans keyed by txid, exported over OTLP: one transaction's spans, from the
//! coordinator and from every participant, form one trace.
//!
//! The collector is a stand-in served from the test: it keeps what it is sent.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{init, serve_in_test};
use decree_client::{kv_payload, v1, KvOp, Outcome};
use decree_tests::{Cluster, NodeId, Options};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;

#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// One exported span, flattened.
#[derive(Debug)]
struct Exported {
    service: String,
    name: String,
    txid: Option<String>,
    participant: Option<String>,
    trace_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

impl Collector {
    fn spans(&self) -> Vec<Exported> {
        let mut out = Vec::new();
        for request in self.received.lock().unwrap().iter() {
            for resource_spans in &request.resource_spans {
                let attributes = resource_spans.resource.as_ref().map(|r| &r.attributes[..]).unwrap_or(&[]);
                let service = text(attributes, "service.name").unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        out.push(Exported {
                            service: service.clone(),
                            name: span.name.clone(),
                            txid: text(&span.attributes, "txid"),
                            participant: text(&span.attributes, "participant"),
                            trace_id: span.trace_id.clone(),
                            parent_span_id: span.parent_span_id.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_one_trace_across_coordinator_and_participants() {
    init();
    let collector = Collector::default();
    let endpoint =
        serve_in_test(tonic::service::Routes::new(TraceServiceServer::new(collector.clone()))).await;
    let mut options = Options::new(2);
    options.coordinator_args = vec!["--otlp-endpoint".into(), endpoint.clone()];
    options.participant_args = vec!["--otlp-endpoint".into(), endpoint];
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();
    let branches = names
        .iter()
        .map(|name| v1::Branch {
            participant: name.clone(),
            payload: kv_payload(vec![KvOp::Put { key: format!("at-{name}"), value: b"1".to_vec() }]),
        })
        .collect();
    let done = client.transact_branches(branches).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed, "{}", done.reason);
    cluster.wait_settled(Duration::from_secs(10)).await.unwrap();

    // A graceful stop exports what is left.
    let nodes: Vec<NodeId> = (0..names.len()).map(NodeId::Participant).chain([NodeId::Coordinator]).collect();
    for node in &nodes {
        cluster.terminate(*node);
    }
    for node in &nodes {
        let status = cluster.wait_exit(*node, Duration::from_secs(20)).await.unwrap();
        assert!(status.success(), "{node:?} exited with {status}");
    }

    let spans: Vec<Exported> =
        collector.spans().into_iter().filter(|s| s.txid.as_deref() == Some(done.txid.as_str())).collect();
    let root = spans
        .iter()
        .find(|s| s.service == "decree-coordinator" && s.name == "transaction")
        .unwrap_or_else(|| panic!("no coordinator span for {}: {spans:#?}", done.txid));
    for name in &names {
        for rpc in ["prepare", "commit"] {
            let branch = spans
                .iter()
                .find(|s| s.name == rpc && s.participant.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no {rpc} span at {name}: {spans:#?}"));
            assert_eq!(branch.service, "decree-participant");
            assert_eq!(branch.trace_id, root.trace_id, "{rpc} at {name} is in the transaction's trace");
            assert!(!branch.parent_span_id.is_empty(), "{rpc} at {name} has a parent");
        }
    }
    let traces: BTreeSet<&Vec<u8>> = spans.iter().map(|s| &s.trace_id).collect();
    assert_eq!(traces.len(), 1, "every span of the transaction is in one trace: {spans:#?}");
}
