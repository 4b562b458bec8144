package relay

import (
	"errors"
	"strings"
)

// parseTextArray parses a one-dimensional Postgres array in text output
// form, e.g. {a,"b c",NULL}. NULL elements are dropped: none of our array
// columns gives them a meaning.
func parseTextArray(s string) ([]string, error) {
	if len(s) < 2 || s[0] != '{' || s[len(s)-1] != '}' {
		return nil, errors.New("not an array literal")
	}
	body := s[1 : len(s)-1]
	if body == "" {
		return nil, nil
	}
	var out []string
	var b strings.Builder
	for i := 0; i < len(body); {
		b.Reset()
		quoted := false
		if body[i] == '"' {
			quoted = true
			i++
			for i < len(body) && body[i] != '"' {
				if body[i] == '\\' && i+1 < len(body) {
					i++
				}
				b.WriteByte(body[i])
				i++
			}
			if i >= len(body) {
				return nil, errors.New("unterminated quoted element")
			}
			i++ // closing quote
		} else {
			for i < len(body) && body[i] != ',' {
				b.WriteByte(body[i])
				i++
			}
		}
		elem := b.String()
		if !quoted && strings.EqualFold(elem, "NULL") {
			elem = ""
		} else if !quoted {
			elem = strings.TrimSpace(elem)
		}
		if quoted || elem != "" {
			out = append(out, elem)
		}
		if i < len(body) {
			if body[i] != ',' {
				return nil, errors.New("expected ',' between elements")
			}
			i++
		}
	}
	return out, nil
}
