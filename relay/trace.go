package relay

import (
	"context"
	"net/http"
	"strconv"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

var traceContext = propagation.TraceContext{}

// startAttemptSpan starts the span of one attempt. It continues the trace
// of the outbox row's traceparent, so the application's request, its
// outbox insert and the webhook show as one trace, and it puts the span's
// own traceparent on the request.
func (r *Relay) startAttemptSpan(ctx context.Context, d *delivery, msgID string, h http.Header) (context.Context, trace.Span) {
	if d.traceparent != "" {
		ctx = traceContext.Extract(ctx, propagation.MapCarrier{"traceparent": d.traceparent})
	}
	ctx, span := r.cfg.Tracer.Start(ctx, "webhook "+d.eventType, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("webhook.id", msgID),
			attribute.String("webhook.endpoint_id", d.endpointID),
			attribute.String("webhook.tenant_id", d.tenantID),
			attribute.String("webhook.event_type", d.eventType),
			attribute.Int("webhook.attempt", d.attempts),
		))
	traceContext.Inject(ctx, propagation.HeaderCarrier(h))
	return ctx, span
}

// endAttemptSpan records the attempt's outcome on its span.
func endAttemptSpan(span trace.Span, d *delivery, status int, class string) {
	if status != 0 {
		span.SetAttributes(attribute.Int("http.response.status_code", status))
	}
	if d.state != StateSucceeded {
		span.SetAttributes(attribute.String("error.type", class))
		span.SetStatus(codes.Error, "attempt "+strconv.Itoa(d.attempts)+": "+d.errText)
	}
	span.End()
}
