package integration

import (
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// What the kernel says about TCP sockets (/proc/net/tcp and tcp6): tests
// wait on this state, not on time, for "a worker has accepted and read this
// connection" or "a worker no longer accepts".

// tcpSock is one line of /proc/net/tcp{,6}.
type tcpSock struct {
	local, remote string
	listen        bool
	rxQueue       int64 // received bytes the owner has not read yet
	inode         string
}

func tcpSockets() []tcpSock {
	var out []tcpSock
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		lines := strings.Split(string(b), "\n")
		for _, line := range lines[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 {
				continue
			}
			_, rx, _ := strings.Cut(fs[4], ":")
			n, _ := strconv.ParseInt(rx, 16, 64)
			out = append(out, tcpSock{local: hexAddr(fs[1]), remote: hexAddr(fs[2]), listen: fs[3] == "0A", rxQueue: n, inode: fs[9]})
		}
	}
	return out
}

// hexAddr decodes /proc/net/tcp's address: the IP as 32-bit words in host
// (little-endian) order, then the port.
func hexAddr(s string) string {
	h, p, _ := strings.Cut(s, ":")
	b, _ := hex.DecodeString(h)
	for i := 0; i+4 <= len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	port, _ := strconv.ParseUint(p, 16, 16)
	return net.JoinHostPort(net.IP(b).String(), strconv.FormatUint(port, 10))
}

// socketInodes maps the socket inodes pid holds to their fd numbers.
func socketInodes(pid int) map[string]int {
	out := map[string]int{}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if in, ok := strings.CutPrefix(target, "socket:["); ok {
			fd, _ := strconv.Atoi(e.Name())
			out[strings.TrimSuffix(in, "]")] = fd
		}
	}
	return out
}

// listeningAddrs lists the addresses of the listening TCP sockets pid
// holds.
func listeningAddrs(pid int) []string {
	held := socketInodes(pid)
	var out []string
	for _, s := range tcpSockets() {
		if _, ok := held[s.inode]; ok && s.listen {
			out = append(out, s.local)
		}
	}
	return out
}

// listenerAt returns the address of the listening TCP socket at fd in pid,
// or "" if there is none (yet).
func listenerAt(pid, fd int) string {
	for in, f := range socketInodes(pid) {
		if f != fd {
			continue
		}
		for _, s := range tcpSockets() {
			if s.inode == in && s.listen {
				return s.local
			}
		}
	}
	return ""
}

// consumedBy reports whether pid holds the server end of c and has read
// every byte that arrived on it.
func consumedBy(c net.Conn, pid int) bool {
	held := socketInodes(pid)
	for _, s := range tcpSockets() {
		if s.local == c.RemoteAddr().String() && s.remote == c.LocalAddr().String() && !s.listen {
			if _, ok := held[s.inode]; ok && s.rxQueue == 0 {
				return true
			}
		}
	}
	return false
}

// waitConsumed waits until pid has accepted c and read what the test wrote
// on it (on loopback a write is in the peer's receive queue when Write
// returns): a request written whole is then in flight in that process.
func waitConsumed(t testing.TB, c net.Conn, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !consumedBy(c, pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not accept and read connection %s within 10s", pid, c.LocalAddr())
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// waitNotListening waits until pid holds no listening TCP socket: a worker
// that closed its listeners has begun its drain.
func waitNotListening(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(listeningAddrs(pid)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still listens on %v after 10s", pid, listeningAddrs(pid))
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}
