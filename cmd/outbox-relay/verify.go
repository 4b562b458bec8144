package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

func runVerify(_ context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("verify", "Check a Standard Webhooks signature. The body is read from --body-file, or from stdin.\nExits 0 when the signature is valid, 1 when it is not.", stderr)
	secret := fs.String("secret", "", "the endpoint's signing secret, whsec_... (required)")
	id := fs.String("id", "", "the webhook-id header (required)")
	ts := fs.String("timestamp", "", "the webhook-timestamp header, Unix seconds (required)")
	sig := fs.String("signature", "", "the webhook-signature header, e.g. \"v1,...\" (required)")
	bodyFile := fs.String("body-file", "", "file holding the exact request body (default: stdin)")
	tolerance := fs.Duration("tolerance", 5*time.Minute, "accept timestamps this far from now; 0 accepts any age")
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	for name, v := range map[string]string{"secret": *secret, "id": *id, "timestamp": *ts, "signature": *sig} {
		if v == "" {
			fmt.Fprintf(stderr, "outbox-relay verify: --%s is required\n", name)
			return 2
		}
	}
	sec, err := signer.ParseSecret(*secret)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay verify:", err)
		return 2
	}
	var body []byte
	if *bodyFile != "" {
		body, err = os.ReadFile(*bodyFile)
	} else {
		body, err = io.ReadAll(stdin)
	}
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay verify: read body:", err)
		return 2
	}
	h := http.Header{}
	h.Set(signer.HeaderID, *id)
	h.Set(signer.HeaderTimestamp, *ts)
	h.Set(signer.HeaderSignature, *sig)
	v := &signer.Verifier{Secrets: []signer.Secret{sec}, Tolerance: *tolerance}
	if *tolerance == 0 {
		v.Tolerance = 100 * 365 * 24 * time.Hour
	}
	if err := v.Verify(h, body); err != nil {
		fmt.Fprintln(stdout, "signature INVALID:", err)
		return 1
	}
	fmt.Fprintln(stdout, "signature valid")
	return 0
}
