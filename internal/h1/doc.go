// Package h1 is a lean HTTP/1.1 client transport for the relay's
// plain-HTTP deliveries.
//
// net/http's Transport runs two goroutines per connection (a read loop and
// a write loop) and hands every request and response between them and the
// caller. Profiles of the relay put that machinery at about 60 % of its
// CPU per delivery on a backlog, and the wakeups it costs at the top of a
// live-rate profile. Transport does the same exchange in the caller's
// goroutine: one write of the whole request, then a read of the answer
// from a buffered reader, with the connection returned to an idle pool
// once the answer's body has been read to its end.
//
// What it promises:
//   - http:// URLs only; the relay keeps net/http (and HTTP/2) for https.
//   - Keep-alive per host:port, at most MaxIdlePerHost idle connections
//     each and MaxIdle over all hosts (the longest idle goes first),
//     reused newest first, closed after IdleTimeout idle.
//   - The request context's deadline bounds the dial, the write and the
//     read of the answer; cancelling the context ends them at once.
//   - Answers are framed as RFC 9112 says: Content-Length, chunked (with
//     trailers), or read until the server closes; 1xx answers before the
//     final one are skipped; 204 and 304 carry no body. A connection is
//     reused only when its answer was read exactly to its end and neither
//     side asked to close it.
//   - A request that fails on a reused connection before any byte of an
//     answer arrived (the server had closed the idle connection) is sent
//     once more on a new connection, as net/http does for requests it may
//     replay. A webhook carries its webhook-id, so a receiver that did see
//     the first copy can tell.
//   - Request header names and values are checked as net/http checks them;
//     userinfo in the URL becomes Basic authorization unless the request
//     sets Authorization itself.
//   - Post is RoundTrip without the http.Request: the request line, Host
//     and fixed headers of one URL are rendered and checked once
//     (Prepare), and each request appends its own fields, Content-Length
//     and body to a copy of them, with an explicit deadline instead of a
//     timeout context per request.
//
// What it does not do: proxies, TLS, HTTP/2, redirects (the relay follows
// none), compression, or keeping every response header. The response it
// returns holds only the headers the relay reads, Location and
// Retry-After; its Header is nil when the answer had neither.
package h1
