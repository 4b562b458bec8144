// Package signer signs and verifies webhooks in the Standard Webhooks v1
// format (https://www.standardwebhooks.com), the wire format the relay sends.
//
// A message is signed by computing HMAC-SHA256 over
//
//	webhook-id + "." + webhook-timestamp + "." + body
//
// with each of the endpoint's secrets and sending the results, base64-encoded
// and prefixed "v1,", space-separated in the webhook-signature header. Sending
// one signature per secret is what makes secret rotation work: a receiver that
// knows either the old or the new secret accepts the message.
//
// What the package promises:
//
//   - Signatures are byte-for-byte those of the reference Standard Webhooks
//     libraries; the tests check this against an independent implementation
//     and the published vectors.
//   - Verification compares signatures in constant time, accepts a message if
//     any v1 signature matches any configured secret, ignores signatures of
//     other versions (v1a, v2, ...), and rejects timestamps further than the
//     tolerance (default 5 minutes) in the past or in the future.
//   - Failures are reported with sentinel errors (ErrMissingHeaders,
//     ErrInvalidTimestamp, ErrTimestampTooOld, ErrTimestampTooNew,
//     ErrNoMatchingSignature, ErrInvalidSecret) for errors.Is.
//   - Secret values never appear in errors, in String/GoString/Format output,
//     or in slog output.
//   - Signer is safe for concurrent use and, once built, signs without
//     allocating beyond growing the caller's buffer.
//
// What it does not do:
//
//   - It does not prevent replays within the tolerance window. Every attempt
//     of one delivery carries the same webhook-id; receivers that must not
//     process a message twice deduplicate on it.
//   - It does not implement the asymmetric (v1a, ed25519) scheme, nor the
//     svix-* header aliases.
//   - It does not generate or store secrets; it parses them.
//   - It depends on the standard library only, and knows nothing of
//     endpoints, deliveries or Postgres.
package signer
