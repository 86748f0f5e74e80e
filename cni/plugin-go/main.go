// Command ambient-cni-plugin is the chained CNI plugin the kubelet's container runtime runs on
// the node: a static binary (CGO_ENABLED=0) that needs nothing from the host but the node
// agent's unix socket. It implements only the CNI I/O contract (spec 1.0.0, plus 1.1.0's GC and
// STATUS) and asks the agent (cni/agent.py, behind cni.plugin.PluginServer) for every decision;
// cni/plugin.py is the same contract in Python, kept for local mode and the tests. See
// docs/cni.md, "The CNI plugin".
package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	os.Exit(run())
}

func run() int {
	setupLog(os.Getenv("AMBIENT_CNI_LOG_LEVEL"))
	var out output
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		out = errorOutput(defaultVersion, errIO, "cannot read stdin", err.Error())
	} else {
		out = runPlugin(os.Getenv, stdin)
	}
	os.Stdout.WriteString(out.stdout)
	return out.exitCode
}

// runPlugin is what the executable does, minus reading stdin and printing.
func runPlugin(getenv func(string) string, stdin []byte) output {
	call, out := handle(getenv, stdin)
	if out != nil {
		return *out
	}
	reply, why := exchange(call)
	return finish(call, reply, why)
}

// exchange sends the request and waits for one reply line: (reply, "") or (nil, why not). The
// timeout applies to each step (connect, send, every read), as Python's socket.settimeout.
func exchange(call *agentCall) ([]byte, string) {
	timeout := time.Duration(call.timeout * float64(time.Second))
	if timeout < 1 {
		timeout = 1 // a config of a few picoseconds means "no time", not "no timeout" (0)
	}
	path := call.socketPath
	// Addresses as Python's socket.connect reads them: a leading NUL is Linux's abstract
	// namespace (Go spells it "@"), a leading "@" is a file of that name.
	if strings.HasPrefix(path, "@") {
		path = "./" + path
	} else if strings.HasPrefix(path, "\x00") {
		path = "@" + path[1:]
	}
	conn, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, err.Error()
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err.Error()
	}
	if _, err := conn.Write(call.request.encode()); err != nil {
		return nil, err.Error()
	}
	var buf []byte
	chunk := make([]byte, 4096)
	for {
		if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return nil, err.Error()
		}
		n, err := conn.Read(chunk)
		if n > 0 {
			buf = append(buf, chunk[:n]...)
			if len(buf) > maxMessage {
				return nil, "agent reply too long"
			}
			if i := bytes.IndexByte(buf, '\n'); i >= 0 {
				return buf[:i], ""
			}
		}
		if errors.Is(err, io.EOF) {
			return nil, "agent closed the connection without a reply"
		}
		if err != nil {
			return nil, err.Error()
		}
	}
}

// setupLog: warnings go to stderr as one JSON object per line unless the level is "error"
// (AMBIENT_CNI_LOG_LEVEL, as for the Python plugin; default warning).
func setupLog(level string) {
	if level == "error" {
		return
	}
	logWarning = func(event string, kv ...string) {
		fields := map[string]interface{}{
			"event":     event,
			"level":     "warning",
			"logger":    "ambient-cni-plugin",
			"timestamp": time.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
		}
		for i := 0; i+1 < len(kv); i += 2 {
			fields[kv[i]] = kv[i+1]
		}
		fmt.Fprintln(os.Stderr, string(marshal(fields)))
	}
}
