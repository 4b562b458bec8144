package main

import (
	"slices"
	"testing"
)

func TestIntList(t *testing.T) {
	var l intList
	if err := l.Set("200000, 1_000_000"); err != nil || !slices.Equal(l, intList{200_000, 1_000_000}) {
		t.Fatalf("Set = %v, %v", l, err)
	}
	if l.String() != "200000,1000000" {
		t.Errorf("String = %q", l.String())
	}
	for _, bad := range []string{"", "0", "-5", "1,x", "1,,2"} {
		if err := l.Set(bad); err == nil {
			t.Errorf("Set(%q): want an error", bad)
		}
	}
}
