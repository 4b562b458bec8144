package signer

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"slices"
	"strconv"
)

// Middleware returns a handler for webhook receivers that verifies each
// request before passing it to next.
//
// It reads the whole body, up to v.MaxBodyBytes (default 1 MiB), and answers
// 413 if it is larger, 400 if it cannot be read, and 401 if verification
// fails, each with a short plain-text reason; next is not called then. On
// success next gets the request with r.Body replaced by the bytes that were
// verified, so it can read them again.
//
// Middleware copies v, so later changes to v have no effect; to rotate
// secrets, build a new handler. It panics if v fails Validate or next is nil,
// which are programming errors.
func Middleware(v *Verifier, next http.Handler) http.Handler {
	if err := v.Validate(); err != nil {
		panic("signer: Middleware: " + err.Error())
	}
	if next == nil {
		panic("signer: Middleware: nil next handler")
	}
	vv := *v
	vv.Secrets = slices.Clone(v.Secrets)
	limit := vv.maxBodyBytes()
	tooLarge := "webhook body too large: limit is " + strconv.FormatInt(limit, 10) + " bytes"

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > limit {
			http.Error(w, tooLarge, http.StatusRequestEntityTooLarge)
			return
		}
		var body []byte
		if r.Body != nil {
			var err error
			body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
			if err != nil {
				var mbe *http.MaxBytesError
				if errors.As(err, &mbe) {
					http.Error(w, tooLarge, http.StatusRequestEntityTooLarge)
					return
				}
				http.Error(w, "read webhook body: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		if err := vv.Verify(r.Header, body); err != nil {
			http.Error(w, "webhook verification failed: "+err.Error(), http.StatusUnauthorized)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		next.ServeHTTP(w, r)
	})
}
