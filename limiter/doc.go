// Package limiter holds the token buckets that cap delivery rates per
// endpoint and per tenant, and lets them be reconfigured while deliveries
// flow.
//
// The relay's scheduler asks [Limiter.Take] before it hands a delivery to a
// worker, so a delivery held back by a limit occupies no worker and is not
// counted as an attempt. Take never blocks and never reads the clock: the
// caller passes now, and on refusal gets back how long to wait, so it can
// park the endpoint until then instead of polling.
//
// # What it promises
//
//   - Take takes one token from the endpoint's bucket and one from the
//     tenant's bucket, or none from either. A refused Take changes nothing.
//   - Over any interval [t0, t1] of the now values passed in, a bucket with
//     rate r and burst b grants at most b + r*(t1-t0) tokens, whatever the
//     number of goroutines and even if their now values arrive out of order:
//     a now earlier than one already seen earns nothing, and a refusal's
//     wait then counts the time it is behind.
//   - The wait returned with a refusal is exact: a Take at now+wait succeeds
//     if nothing else took tokens meanwhile, and a Take one nanosecond
//     earlier would have been refused.
//   - A key with no bucket is unlimited. Configuring a key with an unlimited
//     [Limit] (see [Limit.Unlimited]) removes its bucket.
//   - Reconfiguring a bucket keeps the tokens it has earned so far, capped to
//     the new burst, and applies the new rate from that instant: raising a
//     limit gives no burst of extra tokens, and lowering it takes effect at
//     once. A bucket created from nothing (first configuration, or a change
//     from unlimited to limited) starts full.
//
// # What it does not promise
//
//   - Limits are per process. Several relays that deliver for the same
//     endpoint each enforce the whole limit on their own; they do not share
//     buckets, so the endpoint may see up to N times the rate.
//   - It does not queue or order waiters: after a wait, whoever calls Take
//     first gets the token. Fairness between endpoints is the scheduler's job.
//   - Time is resolved to the nanosecond: waits are rounded up to a whole
//     nanosecond, and rates of 10^9/s or more, and +Inf, count as
//     unlimited. Tokens are counted in float64, so the bound above holds to
//     within float rounding (far below one token over years).
//   - Nothing expires on its own: buckets live until Remove or until their
//     key is configured unlimited.
package limiter
