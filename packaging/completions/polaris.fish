# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_polaris_global_optspecs
    string join \n url= token= config= json h/help V/version
end

function __fish_polaris_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_polaris_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_polaris_using_subcommand
    set -l cmd (__fish_polaris_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c polaris -n "__fish_polaris_needs_command" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_needs_command" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_needs_command" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_needs_command" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_needs_command" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_needs_command" -s V -l version -d 'Print version'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "run" -d 'Run a shell command (async.bash) on hosts and follow it to the end'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "jobs" -d 'List jobs, newest first'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "job" -d 'Show one job: its hosts\' states and results'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "cancel" -d 'Cancel a job: revoke every host job no agent has taken yet'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "hosts" -d 'List registered hosts: when each was last seen, its nodes and labels'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "tree" -d 'Show the fleet tree: products, services, components and their host counts'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "tasks" -d 'Show the standing tasks a host gets (and conflicts between them)'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c polaris -n "__fish_polaris_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c polaris -n "__fish_polaris_using_subcommand run" -l hosts -d 'Hosts to run on, comma-separated (with a target: added to it by name)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l target-node -d 'Run on the hosts at or below this fleet node (repeatable)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l label -d 'Only hosts with this label (repeatable; all must match)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l exclude-hosts -d 'Leave these hosts out of the target (comma-separated)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l timeout -d 'Seconds the command may run on each host (the dispatcher\'s default: 30)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l batch -d 'Roll out in batches of this many hosts, one batch after the other (`batch.size`)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l batch-interval -d 'Seconds between one batch ending and the next starting (`batch.interval`)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l concurrency -d 'At most this many hosts running at once (`concurrency`)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l max-failures -d 'Stop starting hosts once more than this many failed (`max_failures`; needs --batch or --concurrency)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l retries -d 'Try a failed host again, up to this many more times (`retry.max`)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand run" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand run" -l group -d 'Print each host\'s output as one block under a header, not line by line'
complete -c polaris -n "__fish_polaris_using_subcommand run" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand run" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l limit -d 'Jobs per page' -r
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l offset -d 'Jobs to skip' -r
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand jobs" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand job" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand job" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand job" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand job" -l follow -d 'Follow it to the end, as `run` does'
complete -c polaris -n "__fish_polaris_using_subcommand job" -l group -d 'With --follow: each host\'s output as one block under a header'
complete -c polaris -n "__fish_polaris_using_subcommand job" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand job" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand cancel" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand cancel" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand cancel" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand cancel" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand cancel" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand hosts" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand hosts" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand hosts" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand hosts" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand hosts" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand tree" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand tree" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand tree" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand tree" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand tree" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand tasks" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand tasks" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand tasks" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand tasks" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand tasks" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand completions" -l url -d 'Dispatcher base URL, e.g. http://127.0.0.1:8080' -r
complete -c polaris -n "__fish_polaris_using_subcommand completions" -l token -d 'Bearer token (when the dispatcher runs with --tokens)' -r
complete -c polaris -n "__fish_polaris_using_subcommand completions" -l config -d 'Config file (TOML: url, token)' -r -F
complete -c polaris -n "__fish_polaris_using_subcommand completions" -l json -d 'Print the API\'s JSON document instead of a table'
complete -c polaris -n "__fish_polaris_using_subcommand completions" -s h -l help -d 'Print help'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "run" -d 'Run a shell command (async.bash) on hosts and follow it to the end'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "jobs" -d 'List jobs, newest first'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "job" -d 'Show one job: its hosts\' states and results'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "cancel" -d 'Cancel a job: revoke every host job no agent has taken yet'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "hosts" -d 'List registered hosts: when each was last seen, its nodes and labels'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "tree" -d 'Show the fleet tree: products, services, components and their host counts'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "tasks" -d 'Show the standing tasks a host gets (and conflicts between them)'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "completions" -d 'Print a shell completion script'
complete -c polaris -n "__fish_polaris_using_subcommand help; and not __fish_seen_subcommand_from run jobs job cancel hosts tree tasks completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
