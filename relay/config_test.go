package relay

import (
	"strings"
	"testing"
)

// Slot and publication names are checked with the config: the status
// writer puts the slot's name into SQL as a literal.
func TestConfigChecksSlotAndPublicationNames(t *testing.T) {
	for _, c := range []struct {
		slot, pub, wantErr string
	}{
		{"", "", ""},
		{"outbox_relay_2", "pub_1", ""},
		{"Bad-Slot", "", `SlotName "Bad-Slot"`},
		{"s'; DROP TABLE x; --", "", "SlotName"},
		{"", "Pub", `Publication "Pub"`},
	} {
		err := Config{DatabaseURL: "postgres://localhost/db", SlotName: c.slot, Publication: c.pub}.Validate()
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("slot %q, publication %q: %v", c.slot, c.pub, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("slot %q, publication %q: error %v, want one naming %s", c.slot, c.pub, err, c.wantErr)
		}
	}
}
