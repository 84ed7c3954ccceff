package integration

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func TestBadInputIsNamed(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"unparsable listen", []string{"-l", "tcpx://127.0.0.1:80", "--", helloBin}, 2, []string{`--listen "tcpx://127.0.0.1:80"`, "unknown scheme"}},
		{"listen without port", []string{"-l", "127.0.0.1", "--", helloBin}, 2, []string{`--listen "127.0.0.1"`, "HOST:PORT"}},
		{"port in use", []string{"-l", busy.Addr().String(), "--", helloBin}, 1, []string{busy.Addr().String(), "address already in use"}},
		{"missing command", []string{"-l", "127.0.0.1:0", "--", "/nonexistent/server"}, 1, []string{`COMMAND "/nonexistent/server"`}},
		{"bad ready mode", []string{"--ready", "fd:1", "--", helloBin}, 2, []string{`--ready "fd:1"`}},
		{"ready fd on a listener", []string{"-l", "127.0.0.1:0", "--ready", "fd:3", "--", helloBin}, 1, []string{"--ready fd:3 collides"}},
		{"bad drain signal", []string{"--drain-signal", "TERMINATE", "--", helloBin}, 2, []string{`signal "TERMINATE"`}},
		{"no command", []string{"-l", "127.0.0.1:0"}, 2, []string{"no COMMAND"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startUpgrader(t, tc.args...)
			if code := p.wait(10 * time.Second); code != tc.code {
				t.Errorf("exit code %d, want %d", code, tc.code)
			}
			out := p.tail(20)
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("error output does not name %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestNotifyMessagesAreChecked(t *testing.T) {
	// The worker (python, exec'd by the shim, so its pid is the worker's)
	// first sends a malformed message, then a good READY=1.
	py := `import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
s.send(b"READY")
time.sleep(0.1)
s.send(b"STATUS=up\nREADY=1\n")
time.sleep(60)`
	p := startUpgrader(t, "--", "python3", "-c", py)
	bad := p.waitLog(10*time.Second, "malformed notify message", msg("malformed notify message, dropped"))
	if e, _ := bad["error"].(string); !strings.Contains(e, `"READY"`) || !strings.Contains(e, "KEY=VALUE") {
		t.Errorf("malformed-message error %q does not name the line", e)
	}
	p.waitReady(1)
	started := p.waitLog(time.Second, "worker started", msg("worker started", "generation", 1))
	pid := int(started["pid"].(float64))

	// A process that is not a worker (this test) is dropped and named.
	c, err := net.Dial("unixgram", environ(t, pid)["NOTIFY_SOCKET"])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("STOPPING=1")); err != nil {
		t.Fatal(err)
	}
	p.waitLog(10*time.Second, "foreign notify message", msg("notify message from a process that is not a worker, dropped", "pid", os.Getpid()))
	if p.hasLog(msg("worker is stopping on its own, replacing it")) {
		t.Fatal("a foreign STOPPING=1 was acted on")
	}
}
