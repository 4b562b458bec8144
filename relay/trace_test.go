package relay

import (
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// An outbox row's traceparent is continued: the attempt's span is a child
// of the application's span, in the same trace, and the receiver gets the
// attempt span's traceparent.
func TestTraceparentContinuesTheTrace(t *testing.T) {
	t.Parallel()
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(t.Context()) })
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(func(c *Config) { c.Tracer = tp.Tracer("outbox-relay") })
	const traceID, parentID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, traceparent) VALUES ('t', 'invoice.paid', '{}', $1)`,
		"00-"+traceID+"-"+parentID+"-01")
	e.WaitFor("a span", 20*time.Second, func() bool { return len(exp.GetSpans()) == 1 })
	span := exp.GetSpans()[0]
	if span.SpanContext.TraceID().String() != traceID {
		t.Errorf("span trace id %s, want the outbox row's %s", span.SpanContext.TraceID(), traceID)
	}
	if span.Parent.SpanID().String() != parentID {
		t.Errorf("span parent %s, want %s", span.Parent.SpanID(), parentID)
	}
	attrs := map[string]string{}
	for _, kv := range span.Attributes {
		attrs[string(kv.Key)] = kv.Value.String()
	}
	if attrs["webhook.endpoint_id"] != "ep" || attrs["webhook.attempt"] != "1" || attrs["http.response.status_code"] != "200" {
		t.Errorf("span attributes %v", attrs)
	}
	got := rcv.requests()[0].header.Get("Traceparent")
	want := "00-" + traceID + "-" + span.SpanContext.SpanID().String() + "-01"
	if got != want {
		t.Errorf("receiver got traceparent %q, want the attempt span's %q", got, want)
	}
	if !strings.HasPrefix(rcv.requests()[0].id, "msg_") {
		t.Errorf("webhook-id %q", rcv.requests()[0].id)
	}
}
