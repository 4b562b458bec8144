package signer_test

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

func Example() {
	secret, err := signer.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		panic(err)
	}
	msgID, sent, body := "msg_p5jXN8AQM9LWM0D4loKWxJek", time.Unix(1614265330, 0), []byte(`{"test": 2432232314}`)

	// Sender: the three headers of a Standard Webhooks request.
	h := http.Header{}
	h.Set(signer.HeaderID, msgID)
	h.Set(signer.HeaderTimestamp, strconv.FormatInt(sent.Unix(), 10))
	h.Set(signer.HeaderSignature, signer.Sign(msgID, sent, body, secret))
	fmt.Println(h.Get(signer.HeaderSignature))

	// Receiver: ten seconds later.
	v := &signer.Verifier{
		Secrets: []signer.Secret{secret},
		Now:     func() time.Time { return sent.Add(10 * time.Second) },
	}
	fmt.Println("genuine:", v.Verify(h, body))

	err = v.Verify(h, []byte(`{"test": 1}`))
	fmt.Println("tampered:", errors.Is(err, signer.ErrNoMatchingSignature))

	fmt.Println("secret prints as", secret)
	// Output:
	// v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=
	// genuine: <nil>
	// tampered: true
	// secret prints as whsec_REDACTED
}

func ExampleSigner_AppendSignature() {
	oldSecret, _ := signer.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	newSecret, _ := signer.ParseSecret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")

	// Built once per endpoint; during a rotation it signs with both secrets.
	sg := signer.NewSigner(oldSecret, newSecret)

	var buf []byte // reused across deliveries
	buf = sg.AppendSignature(buf[:0], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, []byte(`{"test": 2432232314}`))
	fmt.Println(string(buf))
	// Output:
	// v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,78nXHjpFP0tVJQW5D0SBwmVyyW87BV/rL6MgfM/Bw44=
}

func ExampleMiddleware() {
	secret, _ := signer.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	v := &signer.Verifier{Secrets: []signer.Secret{secret}, MaxBodyBytes: 256 << 10}
	handler := signer.Middleware(v, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Only verified requests get here; r.Body holds the verified bytes.
		w.WriteHeader(http.StatusNoContent)
	}))
	mux := http.NewServeMux()
	mux.Handle("POST /webhooks", handler)
}
