package supervise

import (
	"errors"
	"fmt"
	"os"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/nodeipc"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
)

// IPCKind names a second channel a worker may get besides its handoff
// channel and NOTIFY_SOCKET (Config.IPC).
type IPCKind string

const (
	// IPCNone: the handoff channel and NOTIFY_SOCKET only.
	IPCNone IPCKind = ""
	// IPCNode: Node.js's IPC channel at NODE_CHANNEL_FD, so that a Node.js
	// worker readies and hands off with process.send
	// (docs/reference/node-ipc.md).
	IPCNode IPCKind = "node"
)

// channel is one of a worker's channels that carry handoffs: the
// SOCK_SEQPACKET one of docs/reference/handoff.md, or Node's IPC channel.
// recv is for one goroutine, send for another.
type channel interface {
	// recv returns the next message: a handoff one (with the fds it
	// owns) or sd_notify(3) assignments. An error that isMalformed
	// is about one message; any other ends the channel.
	recv() (m handoff.Message, fds []int, n sdnotify.Message, err error)
	// send sends m with fds, which stay open in the caller.
	send(m handoff.Message, fds []int) error
	close()
	dupFD() (int, error)
	// takenOnSend: a HANDOFF that send returned from without error is
	// the target's (Node's NODE_HANDLE_ACK is its answer), so upgrader
	// answers for it.
	takenOnSend() bool
	// outbox and maxUnanswered bound what waits for this worker: batches
	// queued, and batches forwarded and not answered.
	outbox() int
	maxUnanswered() int
}

func isMalformed(err error) bool {
	return errors.Is(err, handoff.ErrMalformed) || errors.Is(err, nodeipc.ErrMalformed)
}

// seqpacketChannel is the handoff channel of docs/reference/handoff.md.
type seqpacketChannel struct{ s *handoff.Socket }

func (c seqpacketChannel) recv() (handoff.Message, []int, sdnotify.Message, error) {
	m, fds, err := c.s.Recv()
	return m, fds, nil, err
}
func (c seqpacketChannel) send(m handoff.Message, fds []int) error { return c.s.Send(m, fds) }
func (c seqpacketChannel) close()                                  { c.s.Close() }
func (c seqpacketChannel) dupFD() (int, error)                     { return c.s.DupFD() }
func (c seqpacketChannel) takenOnSend() bool                       { return false }
func (c seqpacketChannel) outbox() int                             { return outboxSize }
func (c seqpacketChannel) maxUnanswered() int                      { return maxUnanswered }

// nodeChannel is Node.js's IPC channel (docs/reference/node-ipc.md). Its
// batches hold one connection each when they come from Node, so it queues
// more of them.
type nodeChannel struct{ c nodeipc.Channel }

const nodeQueue = 256

func (c nodeChannel) recv() (handoff.Message, []int, sdnotify.Message, error) {
	in, err := c.c.Recv()
	if err != nil || in.Notify != nil {
		return handoff.Message{}, nil, in.Notify, err
	}
	return *in.Handoff, in.FDs, nil, nil
}
func (c nodeChannel) send(m handoff.Message, fds []int) error { return c.c.Send(m, fds) }
func (c nodeChannel) close()                                  { c.c.Close() }
func (c nodeChannel) dupFD() (int, error)                     { return c.c.DupFD() }
func (c nodeChannel) takenOnSend() bool                       { return true }
func (c nodeChannel) outbox() int                             { return nodeQueue }
func (c nodeChannel) maxUnanswered() int                      { return nodeQueue }

// newSeqpacketChannel makes a worker's handoff channel: our end, and the
// worker's to pass at its UPGRADER_HANDOFF_FD.
func newSeqpacketChannel() (channel, *os.File, error) {
	ours, theirs, err := handoff.Pair()
	if err != nil {
		return nil, nil, err
	}
	c, err := openSeqpacketChannel(ours)
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return c, theirs, nil
}

// openSeqpacketChannel wraps f, upgrader's end of a worker's handoff
// channel: sends time out (sendTimeout), and arrivals are stamped, so
// that a batch's age counts from when its sender sent it
// (forwardMaxAge). It takes f over, closing it on error.
func openSeqpacketChannel(f *os.File) (seqpacketChannel, error) {
	sock, err := handoff.NewSocket(f)
	if err != nil {
		return seqpacketChannel{}, fmt.Errorf("handoff channel: %w", err)
	}
	sock.SetSendTimeout(sendTimeout)
	// Stamps are a refinement: without them (an error no Unix socket of
	// ours gives) a batch's age counts from its read, and a worker's
	// channel is not worth losing over it.
	_ = sock.StampArrivals()
	return seqpacketChannel{sock}, nil
}

// newNodeChannel makes a worker's Node.js IPC channel: our end, and the
// worker's to pass at its NODE_CHANNEL_FD.
func newNodeChannel() (channel, *os.File, error) {
	ours, theirs, err := nodeipc.Pair()
	if err != nil {
		return nil, nil, err
	}
	ch, err := resumeNodeChannel(ours)
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return ch, theirs, nil
}

// resumeNodeChannel wraps f, our end of a Node.js IPC channel, which it
// takes over.
func resumeNodeChannel(f *os.File) (channel, error) {
	conn, err := nodeipc.NewConn(f)
	if err != nil {
		return nil, fmt.Errorf("node IPC channel: %w", err)
	}
	conn.SetSendTimeout(answerTimeout)
	return nodeChannel{nodeipc.Channel{Conn: conn}}, nil
}
