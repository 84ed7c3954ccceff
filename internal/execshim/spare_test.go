package execshim

import (
	"reflect"
	"testing"
)

func TestRequestRoundTrip(t *testing.T) {
	argv, env, slots := []string{"hello", "-addr", ""}, []string{"A=1", "LISTEN_PID=0", "EMPTY="}, []int{0, 1, 1, -1, 2}
	r, ok := parseRequest(EncodeRequest("/usr/bin/hello", argv, env, slots), 3)
	if !ok {
		t.Fatal("own encoding refused")
	}
	want := request{path: "/usr/bin/hello", argv: argv, env: env, slots: slots}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("%+v, want %+v", r, want)
	}
}

func TestParseRequestRefuses(t *testing.T) {
	good := EncodeRequest("/bin/true", []string{"true"}, nil, []int{0, 1})
	for name, c := range map[string]struct {
		b    []byte
		nfds int
	}{
		"empty":              {nil, 2},
		"truncated":          {good[:len(good)-1], 2},
		"trailing bytes":     {append(append([]byte{}, good...), 'x', 0), 2},
		"another magic":      {append([]byte("upgrader-spare-0"), good[len(SpareMagic):]...), 2},
		"slot past the fds":  {good, 1},
		"no argv":            {EncodeRequest("/bin/true", nil, nil, nil), 0},
		"no path":            {EncodeRequest("", []string{"true"}, nil, nil), 0},
		"count past the end": {[]byte(SpareMagic + "\x00/bin/true\x00999\x00true\x00"), 0},
	} {
		if r, ok := parseRequest(c.b, c.nfds); ok {
			t.Errorf("%s: accepted as %+v", name, r)
		}
	}
}

// FuzzParseRequest: any bytes are refused or parsed, never a panic, and
// what parses names only fds that came.
func FuzzParseRequest(f *testing.F) {
	f.Add(EncodeRequest("/bin/true", []string{"true", "x"}, []string{"A=1"}, []int{0, -1, 0}), 1)
	f.Add([]byte(SpareMagic+"\x00"), 0)
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		if nfds < 0 || nfds > SpareMaxFDs {
			return
		}
		r, ok := parseRequest(b, nfds)
		if !ok {
			return
		}
		for i, k := range r.slots {
			if k >= nfds || k < -1 {
				t.Fatalf("slot %d: fd index %d of %d", i, k, nfds)
			}
		}
	})
}
