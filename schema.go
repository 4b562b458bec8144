// Package outboxrelay holds the relay's schema and a helper for Go
// applications that publish events into the outbox.
package outboxrelay

import _ "embed"

// Schema is the whole relay schema (schema.sql). Applying it is idempotent.
//
//go:embed schema.sql
var Schema string
