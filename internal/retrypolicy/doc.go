// Package retrypolicy decides what the outcome of one delivery attempt means
// and when the next attempt, if any, should happen.
//
// Everything here is pure: no clock is read, no randomness is drawn, nothing
// is logged. Callers pass in the response (or the transport error), the
// number of attempts made so far, the current time and, for jitter, a random
// number. That keeps the schedule exactly testable and puts the edges (clock,
// random source) where the relay can control them.
//
// # Classification
//
// [Classify] maps an HTTP status or a transport error to a [Decision]:
//
//   - 2xx: [Success].
//   - 3xx: [Retry]. Redirects are never followed (following one could lead a
//     signed payload somewhere the operator never configured, and around the
//     SSRF guard's intent); the reason quotes the Location header so the
//     operator can fix the endpoint URL.
//   - 408, 425, 429, 500, 502, 503, 504: [Retry].
//   - 410: [Gone] — final, and the endpoint should be disabled.
//   - every other 4xx: [Fail] — final; the receiver rejected this request and
//     sending it again unchanged will not help.
//   - every other 5xx (501, 505, 507, 508, 511, 599, ...): [Retry]. A 5xx
//     says the fault is on the server side, and servers get fixed and
//     redeployed; the schedule bounds how long we keep trying.
//   - 1xx and codes outside 100..599: [Retry], as a misbehaving receiver.
//
// Transport errors are classified by behaviour (errors.Is / errors.As on the
// error chain), never by their text:
//
//   - any error in the chain with a Retryable() bool method decides for
//     itself: false is [Fail] (for example netguard's SSRF block), true is
//     [Retry];
//   - context.Canceled is [Retry] with class "canceled": the relay is
//     shutting down or abandoned the attempt, which says nothing about the
//     receiver;
//   - DNS failures ("dns"), TLS and certificate failures ("tls"), connection
//     refused ("connection_refused"), connection reset or broken pipe
//     ("connection_reset"), unreachable host or network ("unreachable"),
//     timeouts of any kind including context.DeadlineExceeded ("timeout"),
//     the peer closing the connection early, io.EOF or io.ErrUnexpectedEOF
//     ("eof"), other network errors ("network"), and anything else ("other")
//     are all [Retry].
//
// [ErrorClass] returns the class alone, for use as a low-cardinality metrics
// label. An error may name its own class with an ErrorClass() string method.
//
// # Scheduling
//
// A schedule is a list of delays: entry i is the delay before attempt i+1,
// so entry 0 (normally zero) is the delay before the first attempt and
// len(schedule) is the maximum number of attempts. [DefaultSchedule] gives 8
// attempts over about 28 hours; [Exponential] builds a capped exponential
// one. [Delay] reads a schedule; [Next] combines it with the decision, the
// receiver's Retry-After (honoured on 429 and 503 only) and a cap
// ([DefaultMaxDelay], 24h, unless the caller passes another).
//
// [Jitter] spreads a delay by a fraction, given a random number the caller
// draws; apply it at the edge, after [Next]. Jitter may move a delay below a
// Retry-After the receiver asked for; callers that must honour Retry-After
// to the second should jitter upwards only (pass rnd in [0.5, 1)).
//
// What this package does not do: it does not count attempts, persist
// anything, follow redirects, or disable endpoints. It only says what should
// happen.
package retrypolicy
