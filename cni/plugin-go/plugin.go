package main

// The sans-IO core: (environment, stdin) → an agentCall to make or a final output, and
// (call, the agent's reply or its absence) → output. A line-by-line port of cni/plugin.py's
// handle() and finish(): same checks in the same order, same codes, same messages. The shared
// tests in tests/cni run both executables through one table of cases, and a property test
// compares this binary with the Python core on generated input.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

const (
	defaultVersion      = "1.0.0" // for answers when the config's own version is unknown or unsupported
	defaultAgentSocket  = "/var/run/ambient/cni-agent.sock"
	defaultAgentTimeout = 30.0
	protocolVersion     = 1
	maxMessage          = 64 * 1024

	// Well-known error codes (CNI spec, "Error"). 100+ is ours.
	errIncompatibleVersion = 1
	errInvalidEnv          = 4
	errIO                  = 5
	errDecode              = 6
	errInvalidConfig       = 7
	errTryAgain            = 11
	errNotAvailable        = 50 // STATUS: the plugin cannot serve ADDs now
	errAgentRefused        = 100
)

var (
	supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
	commands          = []string{"ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"}
)

// output is what the plugin prints on stdout and its exit code.
type output struct {
	stdout   string
	exitCode int
}

// agentRequest is one pod event for the node agent; the JSON field names are the wire format
// cni.plugin.decode_request reads.
type agentRequest struct {
	Version      int      `json:"version"`
	Command      string   `json:"command"`
	PodNamespace string   `json:"pod_namespace"`
	PodName      string   `json:"pod_name"`
	PodUID       string   `json:"pod_uid"`
	ContainerID  string   `json:"container_id"`
	Netns        string   `json:"netns"`
	Ifname       string   `json:"ifname"`
	IPs          []string `json:"ips"`
}

func (r agentRequest) encode() []byte {
	if r.IPs == nil {
		r.IPs = []string{} // the agent refuses `null`
	}
	return append(marshal(r), '\n')
}

// agentCall: send request to the agent at socketPath and feed the reply to finish.
type agentCall struct {
	request    agentRequest
	socketPath string
	timeout    float64 // seconds
	cniVersion string
	prevResult map[string]interface{} // nil: none
}

type cniError struct {
	code         int
	msg, details string
}

func (e *cniError) Error() string { return e.msg }

func fail(code int, msg, details string) *cniError { return &cniError{code, msg, details} }

// marshal encodes without HTML escaping (like Python's json.dumps); it cannot fail on the
// types used here (strings, numbers as json.Number, maps, slices, bools, nil).
func marshal(v interface{}) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
	return bytes.TrimRight(buf.Bytes(), "\n")
}

func errorOutput(cniVersion string, code int, msg, details string) output {
	body := struct {
		CniVersion string `json:"cniVersion"`
		Code       int    `json:"code"`
		Msg        string `json:"msg"`
		Details    string `json:"details"`
	}{cniVersion, code, msg, details}
	return output{string(marshal(body)) + "\n", 1}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// asciiTrim strips what Python's bytes.strip() strips (ASCII whitespace only).
func asciiTrim(b []byte) []byte {
	return bytes.Trim(b, " \t\n\r\x0b\x0c")
}

// decodeJSON accepts exactly what the Python plugin's strict loader accepts: UTF-8, RFC 8259
// JSON (no NaN/Infinity), one value, nesting at most encoding/json's limit. Numbers stay
// json.Number so a passed-through prevResult keeps its digits.
func decodeJSON(data []byte) (interface{}, error) {
	if !utf8.Valid(data) {
		return nil, errors.New("input is not UTF-8")
	}
	if !json.Valid(data) {
		var v interface{}
		if err := json.Unmarshal(data, &v); err != nil {
			return nil, err
		}
		return nil, errors.New("invalid JSON")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v interface{}
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	return v, nil
}

// pyRepr renders a string the way Python's repr() does, so messages match the Python plugin's.
func pyRepr(s string) string {
	quote := byte('\'')
	if strings.Contains(s, "'") && !strings.Contains(s, "\"") {
		quote = '"'
	}
	var b strings.Builder
	b.WriteByte(quote)
	for _, r := range s {
		switch {
		case r == '\\' || r == rune(quote):
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case unicode.IsPrint(r):
			b.WriteRune(r)
		case r < 0x100:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r < 0x10000:
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			fmt.Fprintf(&b, `\U%08x`, r)
		}
	}
	b.WriteByte(quote)
	return b.String()
}

// parseCniArgs: CNI_ARGS is K=V;K=V; pairs without '=' are an error (code 4).
func parseCniArgs(value string) (map[string]string, *cniError) {
	out := map[string]string{}
	for _, part := range strings.Split(value, ";") {
		if part == "" {
			continue
		}
		k, v, found := strings.Cut(part, "=")
		if !found || k == "" {
			return nil, fail(errInvalidEnv, "CNI_ARGS is malformed", "bad pair "+pyRepr(part))
		}
		out[k] = v
	}
	return out, nil
}

func requiredEnv(getenv func(string) string, names ...string) *cniError {
	var missing []string
	for _, n := range names {
		if getenv(n) == "" {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fail(errInvalidEnv, "missing environment variables: "+strings.Join(missing, ", "), "")
	}
	return nil
}

type config struct {
	cniVersion   string
	agentSocket  string
	agentTimeout float64
	prevResult   map[string]interface{}
}

func parseConfig(obj interface{}) (*config, *cniError) {
	m, ok := obj.(map[string]interface{})
	if !ok {
		return nil, fail(errInvalidConfig, "network configuration is not a JSON object", "")
	}
	for _, key := range []string{"cniVersion", "name", "type"} {
		if s, ok := m[key].(string); !ok || s == "" {
			return nil, fail(errInvalidConfig,
				fmt.Sprintf("network configuration field '%s' is missing or not a string", key), "")
		}
	}
	version := m["cniVersion"].(string)
	if !contains(supportedVersions, version) {
		return nil, fail(errIncompatibleVersion, "unsupported cniVersion "+pyRepr(version),
			"supported: "+strings.Join(supportedVersions, ", "))
	}
	sock := defaultAgentSocket
	if v, present := m["agent_socket"]; present {
		s, ok := v.(string)
		if !ok || s == "" {
			return nil, fail(errInvalidConfig, "network configuration field 'agent_socket' must be a path", "")
		}
		sock = s
	}
	seconds := defaultAgentTimeout
	if v, present := m["agent_timeout"]; present {
		seconds = -1
		if n, ok := v.(json.Number); ok {
			if f, err := strconv.ParseFloat(string(n), 64); err == nil {
				seconds = f // out of range (±Inf, ErrRange) stays -1, as Python's OverflowError
			}
		}
	}
	if !(0 < seconds && seconds < 86400) {
		return nil, fail(errInvalidConfig,
			"network configuration field 'agent_timeout' must be a number of seconds (0 < t < 86400)", "")
	}
	var prev map[string]interface{}
	if v := m["prevResult"]; v != nil {
		p, ok := v.(map[string]interface{})
		if !ok {
			return nil, fail(errInvalidConfig, "network configuration field 'prevResult' must be an object", "")
		}
		prev = p
	}
	return &config{version, sock, seconds, prev}, nil
}

func prevIPs(prev map[string]interface{}) ([]string, *cniError) {
	out := []string{}
	v, present := prev["ips"]
	if !present {
		return out, nil
	}
	list, ok := v.([]interface{})
	if !ok {
		return nil, fail(errInvalidConfig, "prevResult field 'ips' must be a list", "")
	}
	for i, entry := range list {
		var addr string
		if e, ok := entry.(map[string]interface{}); ok {
			addr, _ = e["address"].(string)
		}
		if addr == "" {
			return nil, fail(errInvalidConfig, fmt.Sprintf("prevResult ips[%d].address is missing", i), "")
		}
		out = append(out, strings.SplitN(addr, "/", 2)[0])
	}
	return out, nil
}

func versionOf(obj interface{}) string {
	if m, ok := obj.(map[string]interface{}); ok {
		if v, ok := m["cniVersion"].(string); ok && contains(supportedVersions, v) {
			return v
		}
	}
	return defaultVersion
}

func versionOutput(obj interface{}) output {
	body := struct {
		CniVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}{versionOf(obj), supportedVersions}
	return output{string(marshal(body)) + "\n", 0}
}

// success prints prevResult unchanged (with cniVersion added when it has none).
func success(cniVersion string, prev map[string]interface{}) output {
	result := make(map[string]interface{}, len(prev)+1)
	for k, v := range prev {
		result[k] = v
	}
	if _, present := result["cniVersion"]; !present {
		result["cniVersion"] = cniVersion
	}
	return output{string(marshal(result)) + "\n", 0}
}

// handle is everything the plugin decides before talking to the agent: exactly one of the
// results is non-nil.
func handle(getenv func(string) string, stdin []byte) (*agentCall, *output) {
	var obj interface{}
	call, err := handleOrFail(getenv, stdin, &obj)
	if err != nil {
		out := errorOutput(versionOf(obj), err.code, err.msg, err.details)
		return nil, &out
	}
	return call.call, call.out
}

type step struct {
	call *agentCall
	out  *output
}

func done(o output) *step { return &step{out: &o} }

func handleOrFail(getenv func(string) string, stdin []byte, objp *interface{}) (*step, *cniError) {
	command := getenv("CNI_COMMAND")
	if !contains(commands, command) {
		return nil, fail(errInvalidEnv,
			fmt.Sprintf("CNI_COMMAND %s is not one of %s", pyRepr(command), strings.Join(commands, ", ")), "")
	}
	if len(asciiTrim(stdin)) > 0 {
		v, err := decodeJSON(stdin)
		if err != nil {
			return nil, fail(errDecode, "network configuration on stdin is not JSON", err.Error())
		}
		*objp = v
	}
	obj := *objp
	if command == "VERSION" {
		return done(versionOutput(obj)), nil
	}
	if obj == nil {
		return nil, fail(errDecode, "no network configuration on stdin", "")
	}
	conf, cerr := parseConfig(obj)
	if cerr != nil {
		return nil, cerr
	}
	switch command {
	case "GC":
		return done(output{"", 0}), nil // the agent reconciles pods from its own watch
	case "STATUS":
		req := agentRequest{Version: protocolVersion, Command: "STATUS"}
		return &step{call: &agentCall{req, conf.agentSocket, conf.agentTimeout, conf.cniVersion, nil}}, nil
	}
	if e := requiredEnv(getenv, "CNI_CONTAINERID", "CNI_IFNAME"); e != nil {
		return nil, e
	}
	if command == "ADD" {
		if e := requiredEnv(getenv, "CNI_NETNS"); e != nil {
			return nil, e
		}
	}
	if (command == "ADD" || command == "CHECK") && conf.prevResult == nil {
		return nil, fail(errInvalidConfig,
			command+": no prevResult (this plugin must be chained after another)", "")
	}
	if command == "CHECK" {
		return done(output{"", 0}), nil
	}
	args, cerr := parseCniArgs(getenv("CNI_ARGS"))
	if cerr != nil {
		return nil, cerr
	}
	namespace, name := args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"]
	prev := conf.prevResult
	if namespace == "" || name == "" {
		// Not a Kubernetes pod (as Istio's plugin): nothing to enrol, pass the result through.
		if command == "ADD" {
			return done(success(conf.cniVersion, prev)), nil
		}
		return done(output{"", 0}), nil
	}
	ips := []string{}
	if prev != nil && command == "ADD" { // DEL never fails on it
		if ips, cerr = prevIPs(prev); cerr != nil {
			return nil, cerr
		}
	}
	req := agentRequest{
		Version:      protocolVersion,
		Command:      command,
		PodNamespace: namespace,
		PodName:      name,
		PodUID:       args["K8S_POD_UID"],
		ContainerID:  getenv("CNI_CONTAINERID"),
		Netns:        getenv("CNI_NETNS"),
		Ifname:       getenv("CNI_IFNAME"),
		IPs:          ips,
	}
	return &step{call: &agentCall{req, conf.agentSocket, conf.agentTimeout, conf.cniVersion, prev}}, nil
}

type agentReply struct {
	ok    bool
	error string
}

// pyStr approximates Python's str() of a decoded JSON value (the agent's "error" field is a
// string in practice; anything else is shown, not refused, as in the Python plugin).
func pyStr(v interface{}) string {
	switch x := v.(type) {
	case string:
		return x
	case nil:
		return "None"
	case bool:
		if x {
			return "True"
		}
		return "False"
	default:
		return string(marshal(x))
	}
}

func decodeReply(data []byte) (*agentReply, error) {
	obj, err := decodeJSON(data)
	if err != nil {
		return nil, fmt.Errorf("agent reply is not JSON: %v", err)
	}
	m, isMap := obj.(map[string]interface{})
	ok, isBool := m["ok"].(bool)
	if !isMap || !isBool {
		return nil, errors.New("agent reply has no boolean 'ok'")
	}
	msg := ""
	if v, present := m["error"]; present {
		msg = pyStr(v)
	}
	return &agentReply{ok, msg}, nil
}

// logWarning is the one log line the plugin writes (stderr, a JSON object like structlog's).
var logWarning = func(event string, kv ...string) {}

// finish turns the agent's reply (nil: unreachable, see transportError) into the output. ADD
// fails with code 11 (try again) when the agent cannot be reached: the runtime retries the
// sandbox, and the pod never starts without redirection. DEL is best effort: always succeeds.
func finish(call *agentCall, reply []byte, transportError string) output {
	cmd := call.request.Command
	var parsed *agentReply
	if reply != nil {
		p, err := decodeReply(reply)
		if err != nil {
			transportError = err.Error()
		} else {
			parsed = p
		}
	}
	if cmd == "DEL" {
		if parsed == nil || !parsed.ok {
			why := transportError
			if parsed != nil {
				why = parsed.error
			}
			logWarning("DEL not confirmed by the agent; ignored (best effort)", "error", why)
		}
		return output{"", 0}
	}
	if parsed == nil {
		if cmd == "STATUS" {
			return errorOutput(call.cniVersion, errNotAvailable, "node agent is not reachable", transportError)
		}
		return errorOutput(call.cniVersion, errTryAgain,
			fmt.Sprintf("node agent at %s is not reachable", call.socketPath), transportError)
	}
	if !parsed.ok {
		code := errAgentRefused
		if cmd == "STATUS" {
			code = errNotAvailable
		}
		msg := parsed.error
		if msg == "" {
			msg = "node agent refused the pod"
		}
		return errorOutput(call.cniVersion, code, msg, "")
	}
	if cmd == "STATUS" {
		return output{"", 0}
	}
	return success(call.cniVersion, call.prevResult)
}
