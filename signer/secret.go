package signer

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// SecretPrefix is the conventional prefix of a Standard Webhooks secret.
const SecretPrefix = "whsec_"

// MinSecretBytes is the shortest key ParseSecret and NewSecret accept. The
// Standard Webhooks specification asks for keys of 24 to 64 bytes; shorter
// keys make HMAC guessable offline.
const MinSecretBytes = 24

// ErrInvalidSecret is wrapped by every error from ParseSecret and NewSecret.
var ErrInvalidSecret = errors.New("invalid webhook secret")

const redacted = SecretPrefix + "REDACTED"

// Secret is an HMAC key for signing or verifying webhooks. Build it with
// ParseSecret or NewSecret; the zero value holds no key and is rejected by
// Verifier.Validate, and Sign and NewSigner panic on it.
//
// Printing a Secret with fmt, or logging it with log/slog, shows only
// "whsec_REDACTED".
type Secret struct {
	key []byte
}

// ParseSecret parses a secret in the "whsec_<base64>" form, or bare base64 as
// other Standard Webhooks libraries accept. Surrounding whitespace is
// ignored, and base64 without padding is accepted. The key must be at least
// MinSecretBytes long.
//
// Errors wrap ErrInvalidSecret and say what is wrong, never what the secret is.
func ParseSecret(s string) (Secret, error) {
	s = strings.TrimSpace(s)
	s = strings.TrimPrefix(s, SecretPrefix)
	if s == "" {
		return Secret{}, fmt.Errorf("%w: empty (want whsec_ followed by base64)", ErrInvalidSecret)
	}
	enc := base64.StdEncoding
	if !strings.HasSuffix(s, "=") && len(s)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	key, err := enc.DecodeString(s)
	if err != nil {
		var corrupt base64.CorruptInputError
		if errors.As(err, &corrupt) {
			// The offset says where to look without echoing the secret.
			return Secret{}, fmt.Errorf("%w: not valid standard base64 after the whsec_ prefix (bad input at byte %d of %d)",
				ErrInvalidSecret, int64(corrupt), len(s))
		}
		return Secret{}, fmt.Errorf("%w: not valid standard base64 after the whsec_ prefix", ErrInvalidSecret)
	}
	return newSecret(key)
}

// NewSecret makes a Secret from raw key bytes, which it copies. The key must
// be at least MinSecretBytes long.
func NewSecret(key []byte) (Secret, error) {
	return newSecret(append([]byte(nil), key...))
}

func newSecret(key []byte) (Secret, error) {
	if len(key) < MinSecretBytes {
		return Secret{}, fmt.Errorf("%w: key is %d bytes, need at least %d", ErrInvalidSecret, len(key), MinSecretBytes)
	}
	return Secret{key: key}, nil
}

// IsZero reports whether s holds no key.
func (s Secret) IsZero() bool { return len(s.key) == 0 }

// String returns "whsec_REDACTED", so that a Secret printed by mistake does
// not leak.
func (s Secret) String() string { return redacted }

// GoString redacts %#v too.
func (s Secret) GoString() string { return "signer.Secret{" + redacted + "}" }

// Format redacts every fmt verb, including the ones (%d, %x on a struct)
// that would otherwise print the key bytes.
func (s Secret) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		_, _ = f.Write([]byte(s.GoString()))
		return
	}
	_, _ = f.Write([]byte(redacted))
}

// LogValue redacts the secret in log/slog output.
func (s Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText redacts the secret when it is encoded as JSON, YAML or text,
// so that a config struct dumped for debugging does not leak it.
func (s Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
