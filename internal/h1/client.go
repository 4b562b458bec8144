package h1

import "net/http"

// Client sends http:// requests through Plain and every other request
// (https, or all of them when Plain is nil) through Other. It follows
// whatever redirect policy Other has for the latter; Plain follows none.
type Client struct {
	Plain *Transport
	Other *http.Client
}

// Do sends req as Plain.RoundTrip or Other.Do would.
func (c *Client) Do(req *http.Request) (*http.Response, error) {
	if c.Plain != nil && req.URL.Scheme == "http" {
		return c.Plain.RoundTrip(req)
	}
	return c.Other.Do(req)
}

// CloseIdleConnections closes the idle connections of both.
func (c *Client) CloseIdleConnections() {
	c.Other.CloseIdleConnections()
	if c.Plain != nil {
		c.Plain.CloseIdleConnections()
	}
}
