package sockets

import (
	"net"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseSpec(t *testing.T) {
	for in, want := range map[string]Spec{
		"127.0.0.1:8080":               {Name: "tcp-127.0.0.1-8080", Network: "tcp", Address: "127.0.0.1:8080"},
		"web=tcp://0.0.0.0:80":         {Name: "web", Network: "tcp", Address: "0.0.0.0:80"},
		"tcp6://[::1]:8080":            {Name: "tcp6---1-8080", Network: "tcp6", Address: "[::1]:8080"},
		"tcp4://:http":                 {Name: "tcp4--http", Network: "tcp4", Address: ":http"},
		"unix:///run/app.sock":         {Name: "unix-/run/app.sock", Network: "unix", Address: "/run/app.sock"},
		"dns=udp://127.0.0.1:53":       {Name: "dns", Network: "udp", Address: "127.0.0.1:53"},
		"unixgram:///run/log=x.sock":   {Name: "unixgram-/run/log=x.sock", Network: "unixgram", Address: "/run/log=x.sock"},
		"admin=unix://@upgrader-admin": {Name: "admin", Network: "unix", Address: "@upgrader-admin"},
	} {
		got, err := ParseSpec(in)
		if err != nil || got != want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "8080", "127.0.0.1", "sctp://1.2.3.4:5", "unix://relative.sock", "tcp://host:99999",
		"a:b=tcp://1.2.3.4:5", "=tcp://1.2.3.4:5", "tcp://bad host:80", "unix:///" + strings.Repeat("x", 200)} {
		_, err := ParseSpec(in)
		if err == nil || !strings.Contains(err.Error(), "--listen") {
			t.Errorf("ParseSpec(%q): %v, want an error naming --listen", in, err)
		}
	}
}

func FuzzParseSpec(f *testing.F) {
	for _, s := range []string{"127.0.0.1:80", "n=unix:///a", "udp://[::1]:53", "x=y=z", "tcp://:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := ParseSpec(in)
		if err != nil {
			if !strings.Contains(err.Error(), "--listen") {
				t.Fatalf("error %q does not name the flag", err)
			}
			return
		}
		if s.Name == "" || strings.Contains(s.Name, ":") || len(s.Name) > 255 || s.Address == "" {
			t.Fatalf("bad spec %+v from %q", s, in)
		}
	})
}

func TestBindKeepsSocketNonBlockingAndCloseOnExec(t *testing.T) {
	for _, in := range []string{"127.0.0.1:0", "udp://127.0.0.1:0", "unix://" + filepath.Join(t.TempDir(), "s.sock")} {
		spec, err := ParseSpec(in)
		if err != nil {
			t.Fatal(err)
		}
		s, err := Bind(spec)
		if err != nil {
			t.Fatal(err)
		}
		fl, err := unix.FcntlInt(uintptr(s.FD), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_NONBLOCK == 0 {
			t.Errorf("%s: flags %o, want O_NONBLOCK", in, fl)
		}
		fd, _ := unix.FcntlInt(uintptr(s.FD), unix.F_GETFD, 0)
		if fd&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s: not close-on-exec", in)
		}
		if spec.Stream() {
			// Still listening after the Go listener that bound it is gone.
			c, err := net.Dial(spec.Network, s.Addr())
			if err != nil {
				t.Errorf("%s: dial %s: %v", in, s.Addr(), err)
			} else {
				c.Close()
			}
		}
		s.Close()
	}
}

func TestBindNamesAddressInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	spec, _ := ParseSpec(l.Addr().String())
	_, err = Bind(spec)
	if err == nil || !strings.Contains(err.Error(), l.Addr().String()) || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Bind on a busy port: %v", err)
	}
	// A live Unix socket is not taken over; a stale one is replaced.
	path := filepath.Join(t.TempDir(), "live.sock")
	ul, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	spec, _ = ParseSpec("unix://" + path)
	if _, err := Bind(spec); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Bind on a live unix socket: %v", err)
	}
	ul.(*net.UnixListener).SetUnlinkOnClose(false)
	ul.Close()
	s, err := Bind(spec)
	if err != nil {
		t.Fatalf("Bind over a stale unix socket: %v", err)
	}
	s.Close()
}
